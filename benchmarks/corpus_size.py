"""How much each bundled code corpus gives: files, documents after the domain's filters, bytes and
tokens under a run's tokenizer (not a speed claim; the figures behind README's corpus notes).

    .venv/bin/python benchmarks/corpus_size.py RUN_DIR
"""

from __future__ import annotations

import sys
import time

from multiar.run_folder import load_run


def main() -> None:
    domain = load_run(sys.argv[1]).domain
    tokenizer = domain._trained()
    for corpus in ("stdlib", "site-packages"):
        started = time.perf_counter()
        files = domain.default_paths(corpus)
        texts, unreadable, filtered = [], 0, 0
        for f in files:
            try:
                records = list(domain.read(f))  # size, UTF-8 and NUL checks, as training applies them
            except (ValueError, OSError):
                unreadable += 1
                continue
            for record in records:
                try:
                    domain.content(record)  # require_parse
                    texts.append(record)
                except ValueError:
                    filtered += 1
        tokens = sum(
            len(e.ids)
            for i in range(0, len(texts), 256)
            for e in tokenizer.encode_batch(texts[i : i + 256], add_special_tokens=False)
        )
        mb = sum(len(t.encode()) for t in texts) / 1e6
        print(
            f"{corpus}: {len(files)} files, {unreadable} unreadable, {filtered} not parsing, {len(texts)} documents, "
            f"{mb:.1f} MB, {tokens:,} tokens, {len(domain.licenses) if corpus != 'stdlib' else '-'} packages "
            f"({time.perf_counter() - started:.0f} s)"
        )


if __name__ == "__main__":
    main()
