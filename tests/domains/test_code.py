"""Code in depth: corpus hygiene, fill-in-the-middle as one transform for every domain, block stopping,
validity and copy metrics, provenance in every file."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from Bio import SeqIO
from conftest import TINY, bundled_files

from multiar.commands.generate import sample_to_files, stop_rule
from multiar.config import load_config
from multiar.data.corpus import prepare_corpus
from multiar.data.fim import fim_transform, reassemble, transform_documents
from multiar.data.source import Source
from multiar.domains import build_domain
from multiar.domains.code.analysis import LineIndex, block_end, compiles, parses
from multiar.domains.code.domain import complete_block_end
from multiar.errors import ConfigError
from multiar.training.run import train


def train_run(tmp_path, domain, paths, *extra, steps=40):
    overrides = [
        *TINY,
        f"domain={domain}",
        f"data.paths=[{paths}]",
        f"run_dir={tmp_path / 'run'}",
        f"trainer.max_steps={steps}",
        f"trainer.val_check_interval={steps}",
        "data.val_fraction=0.2",
        *extra,
    ]
    train(load_config("train", overrides))
    return tmp_path / "run"


def generate(run, out, *overrides):
    return sample_to_files(load_config("generate", [f"run={run}", f"out={out}", "dtype=fp32", *overrides]))


@pytest.fixture(scope="module")
def fim_code_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fimcode")
    data = tmp / "src"
    data.mkdir()
    for f in bundled_files("code", 40):
        (data / f.name).write_text(f.read_text(encoding="utf-8"), encoding="utf-8")
    return train_run(tmp, "code", data, "domain.settings.fim_rate=0.5", "domain.settings.vocab_size=512")


def test_tokenizer_round_trips_real_files_exactly():
    domain = build_domain("code", {"vocab_size": 512})
    files = bundled_files("code", 30)
    domain.fit(f.read_text(encoding="utf-8") for f in files)
    tricky = "def f():\n\treturn 'é∑ 😀'  # tab and unicode\r\n\n\n"
    for text in [f.read_text(encoding="utf-8") for f in files[:10]] + [tricky]:
        assert domain.decode(domain.encode(text))[0] == text


def test_fim_transform_reassembles_the_original_psm_and_spm():
    rng = random.Random(0)
    fim_ids = (900, 901, 902)
    for _ in range(200):
        ids = [rng.randrange(3, 100) for _ in range(rng.randrange(0, 30))]
        for spm in (False, True):
            out = fim_transform(ids, fim_ids, rng, spm=spm)
            assert sorted(out) == sorted(ids + list(fim_ids))
            assert out[0] == (902 if spm else 900)
            assert reassemble(out, fim_ids) == ids


def test_fim_is_applied_at_the_configured_rate_after_the_tags():
    keys = [f"f#{i}" for i in range(3000)]
    docs = [[50, 5, 6, 7, 8]] * 3000  # 50: a control tag
    out = transform_documents(keys, docs, (900, 901, 902), rate=0.4, spm_rate=0.25, seed=1, keep_front=[50])
    moved = [d for d in out if 901 in d]
    assert 0.36 < len(moved) / 3000 < 0.44
    assert all(d[0] == 50 for d in out)  # the tag stays first
    spm = sum(d[1] == 902 for d in moved) / len(moved)
    assert 0.2 < spm < 0.3
    assert all(reassemble(d[1:], (900, 901, 902)) == [5, 6, 7, 8] for d in moved)
    assert out == transform_documents(keys, docs, (900, 901, 902), 0.4, 0.25, seed=1, keep_front=[50])


def test_infill_returns_the_middle_and_writes_the_reassembled_file(fim_code_run, tmp_path):
    prefix, suffix = "def add(a, b):\n    ", "\n\nprint(add(1, 2))\n"
    report = generate(
        fim_code_run,
        tmp_path / "o",
        "n=3",
        "max_new_tokens=30",
        f"prompt_prefix={prefix}",
        f"prompt_suffix={suffix}",
    )
    assert len(report["middles"]) == 3
    for i, middle in enumerate(report["middles"]):
        text = (tmp_path / "o" / f"sample_{i:03d}.py").read_text(encoding="utf-8")
        body = text.split("\n", 1)[1]  # after the provenance line
        assert body == prefix + middle + suffix
    gap = tmp_path / "gap.py"
    gap.write_text("import os\n\ndef f():\n    <FILL>\n\nf()\n", encoding="utf-8")
    report = generate(fim_code_run, tmp_path / "o2", "n=2", "max_new_tokens=20", f"infill={gap}")
    text = (tmp_path / "o2" / "sample_001.py").read_text(encoding="utf-8").split("\n", 1)[1]
    assert text == "import os\n\ndef f():\n    " + report["middles"][1] + "\n\nf()\n"
    (tmp_path / "two.py").write_text("<FILL> <FILL>")
    with pytest.raises(ConfigError, match="needs exactly one <FILL>"):
        generate(fim_code_run, tmp_path / "o3", f"infill={tmp_path / 'two.py'}")


def test_fim_is_generic_protein_enables_it_by_config(tmp_path):
    from conftest import proteome_subset

    data = proteome_subset(tmp_path / "data", per_file=40)
    run = train_run(
        tmp_path, "protein", data, "domain.settings.fim_rate=0.5", "model.block_size=128", steps=20
    )
    report = generate(
        run, tmp_path / "o", "n=2", "max_new_tokens=15", "prompt_prefix=MKTAY", "prompt_suffix=GLIKR"
    )
    for record, middle in zip(
        SeqIO.parse(tmp_path / "o" / "samples.fasta", "fasta"), report["middles"], strict=True
    ):
        assert str(record.seq) == "MKTAY" + middle + "GLIKR"
    plain = train_run(tmp_path / "plain", "protein", data, "model.block_size=128", steps=2)
    with pytest.raises(ConfigError, match="trained without fill-in-the-middle"):
        generate(plain, tmp_path / "o2", "prompt_prefix=MK")


def test_block_end_is_the_dedent_after_the_first_block():
    text = "def parse(x):\n    if x:\n        return 1\n    else:\n        return 2\n\n# note\ndef other():\n    pass\n"
    assert (
        text[: block_end(text, 10)]
        == "def parse(x):\n    if x:\n        return 1\n    else:\n        return 2\n\n# note\n"
    )
    assert block_end("def f():\n    return 1\nx = 1", 5) is None  # the top-level line is not complete yet
    assert block_end("def f():\n    return 1\nx = 1", 5, final=True) == len("def f():\n    return 1\n")
    assert block_end("try:\n    a()\nexcept E:\n    b()\n", 0, final=True) is None  # except continues it
    two = "def a():\n    pass\n\ndef parse(y):\n    return y\nz = 3\n"
    assert two[block_end(two, two.index("parse")) :] == "z = 3\n"


def test_stop_at_block_ends_each_sample_after_its_function(fim_code_run, tmp_path):
    report = generate(
        fim_code_run, tmp_path / "o", "n=4", "max_new_tokens=120", "prompt=def parse(", "stop_at=block"
    )
    for path in report["files"]:
        if not path.endswith(".py"):
            continue
        text = Path(path).read_text(encoding="utf-8").split("\n", 1)[1]
        assert text.startswith("def parse(")
        # nothing after the block: the first place it ends and the text before parses
        assert complete_block_end(text, len("def parse("), final=True) in (None, len(text))
    with pytest.raises(ConfigError, match="stop_at: the protein domain has no stopping rules"):
        stop_rule(load_config("generate", ["run=r", "stop_at=block"]), build_domain("protein"))
    with pytest.raises(ConfigError, match="stop_at: unknown rule 'line'; the code domain has block"):
        stop_rule(load_config("generate", ["run=r", "stop_at=line"]), build_domain("code"))


def test_corrupt_binary_latin1_unparsable_and_environment_files_are_skipped_and_counted(tmp_path, caplog):
    src = tmp_path / "proj"
    for sub in ("pkg", ".venv/lib", ".git/hooks", "node_modules/x", "pkg/__pycache__"):
        (src / sub).mkdir(parents=True)
    for i in range(4):
        (src / "pkg" / f"good{i}.py").write_text(f"def f{i}(x):\n    return x + {i}\n")
    (src / "pkg" / "latin1.py").write_bytes("s = 'caf\xe9'\n".encode("latin-1"))
    (src / "pkg" / "binary.py").write_bytes(b"\x00\x01\x02 not code")
    (src / "pkg" / "py2.py").write_text("print 'hello'\n")
    for hidden in (".venv/lib/a.py", ".git/hooks/b.py", "node_modules/x/c.py", "pkg/__pycache__/d.py"):
        (src / hidden).write_text("x = 1\n")
    domain = build_domain("code", {"vocab_size": 300})
    corpus = prepare_corpus(domain, source=Source(domain, [str(src)]), cache_dir=tmp_path / "cache")
    stats = corpus.stats
    assert stats["files"] == 7  # the four in environment folders are left out
    assert stats["files_skipped"] == 2  # latin-1 and NUL bytes
    assert stats["records_skipped"] == 1  # Python 2: does not parse (require_parse)
    assert stats["documents_train"] + stats["documents_val"] == 4
    keep = build_domain("code", {"vocab_size": 300, "require_parse": False})
    corpus = prepare_corpus(keep, source=Source(keep, [str(src)]), cache_dir=tmp_path / "cache2")
    assert corpus.stats["documents_train"] + corpus.stats["documents_val"] == 5


def test_code_metrics_on_hand_written_snippets():
    ok, outside, broken = "def f():\n    return 1\n", "return 1\n", "def f(:\n"
    assert parses(ok) and compiles(ok)
    assert parses(outside) and not compiles(outside)  # parses, but 'return' outside a function
    assert not parses(broken) and not compiles(broken)
    training = "import os\n\ndef area(w, h):\n    checked = max(w, 0)\n    other = max(h, 0)\n    return checked * other\n"
    index = LineIndex.build([training, "x = 1\n"])
    copied = "def area(w, h):\n    checked = max(w, 0)\n\n    other = max(h, 0)\n    return checked * other\nprint(1)\n"
    assert index.longest_run(copied) == 4 and index.longest_run("y = 2\nx = 1\n") == 1
    domain = build_domain("code", {"vocab_size": 300})
    domain.fit([training, "x = 1\n"])
    m = domain.metrics([ok, outside, broken, copied])
    assert m["code/parse_rate"] == 0.75 and m["code/compile_rate"] == 0.5
    assert m["code/copied_share"] == 0.25 and m["code/longest_copied_run_mean"] == pytest.approx(
        (0 + 0 + 0 + 4) / 4
    )


def test_every_sample_file_carries_its_provenance(fim_code_run, tmp_path):
    generate(fim_code_run, tmp_path / "o", "n=2", "max_new_tokens=10", "seed=7", "temperature=0.5")
    first = (tmp_path / "o" / "sample_000.py").read_text(encoding="utf-8").splitlines()[0]
    assert first.startswith("# multiar sample: run=") and "seed=7" in first and "temperature=0.5" in first


def test_site_packages_corpus_lists_installed_sources_with_licences():
    domain = build_domain("code")
    files = domain.default_paths("site-packages")
    assert len(files) > 100 and all(f.suffix == ".py" for f in files)
    assert not any("__pycache__" in f.parts for f in files)
    assert domain.licenses.get("PyYAML") == "MIT"
    with pytest.raises(ValueError, match="choose stdlib or site-packages"):
        domain.default_paths("nope")
    assert json.dumps(domain.licenses)


def test_lexical_scan_accepts_real_code_and_catches_unsound_text():
    from multiar.domains.code.syntax import Unsound, scan

    for f in bundled_files("code", 60):
        lexer = scan(f.read_text(encoding="utf-8"))  # real files are sound and may end
        assert lexer.could_end(), f
    for bad in ("x = (1]\n", "def f():\nreturn 1\n", 'x = "abc\n', "if a:\n    b\n  c\n", "x = $\n", "  x = 1\n",
                "if a:\n\t b\n"):  # fmt: skip
        with pytest.raises(Unsound):
            scan(bad)
    assert not scan("def f(x):\n").could_end() and not scan("x = (1,\n").could_end()
    assert not scan('s = """open\n').could_end() and scan("s = ''\n").could_end()


def test_constraint_is_a_function_of_the_ids_it_is_given(fim_code_run):
    import torch

    from multiar.run_folder import load_run

    domain = load_run(fim_code_run).domain
    ids = domain.prompt_ids("def f(x):\n    return (x")
    other = domain.prompt_ids("class A:\n    pass\n")
    logits = torch.randn(1, domain.vocab_size, generator=torch.Generator().manual_seed(0))
    warm = domain.constraint()
    warm(torch.tensor([ids]), logits.clone())
    warm(torch.tensor([other]), logits.clone())  # another row: the state must not leak
    extended = ids + [domain.encode(")")[0]]
    got = warm(torch.tensor([extended]), logits.clone())
    fresh = domain.constraint()
    assert torch.equal(torch.isinf(got), torch.isinf(fresh(torch.tensor([extended]), logits.clone())))
    # the per-token check (what the decode loop asks of drawn tokens) agrees token by token
    answers = [warm.sound(extended, t) for t in range(domain.vocab_size)]
    assert answers == [fresh.sound(extended, t) for t in range(domain.vocab_size)]
    assert 0 < sum(answers) < domain.vocab_size and not warm.sound(ids, domain.eos_id)


def test_end_reasons_stand_beside_parsing_in_the_report_and_bad_prompts_are_one_line_errors(
    fim_code_run, tmp_path
):
    """syntax_report.tsv: file, parses or not, why the sample ended; generate.json: per end reason the
    share of samples and how many of them parse. A prompt no continuation makes valid: ConfigError."""
    report = generate(
        fim_code_run, tmp_path / "o", "n=4", "max_new_tokens=40", "prompt=def parse(", "stop_at=block"
    )
    lines = [x.split("\t") for x in (tmp_path / "o" / "syntax_report.tsv").read_text().splitlines()]
    rows = [x for x in lines if not x[0].startswith("#")]
    assert len(rows) == 4 and all(
        len(x) in (3, 4) and x[2] in ("eos", "block", "length", "no_valid_token") for x in rows
    )
    metrics = report["metrics"]
    shares = {k: v for k, v in metrics.items() if k.startswith("code/end_") and k.endswith("_share")}
    assert abs(sum(shares.values()) - 1) < 1e-9
    for x in rows:  # a block that ended by itself parses
        assert x[2] != "block" or x[1] == "ok"
    with pytest.raises(ConfigError, match="prompt line 2"):
        generate(fim_code_run, tmp_path / "bad", "n=1", "max_new_tokens=4", "prompt=import os\nx = = 1\n")


def test_constrained_samples_stay_sound_and_invalid_ones_are_redrawn(fim_code_run, tmp_path):
    from multiar.domains.code.grammar import first_bad_line
    from multiar.domains.code.syntax import Unsound, scan

    base = ["n=6", "max_new_tokens=60", "prompt=def f(x):\n    ", "seed=3"]
    report = generate(fim_code_run, tmp_path / "c", *base)
    for i in range(6):
        text = (tmp_path / "c" / f"sample_{i:03d}.py").read_text(encoding="utf-8").split("\n", 1)[1]
        try:
            scan(text)
        except Unsound as err:  # only the last, unfinished line may be cut by the token cap
            pytest.fail(f"sample {i} unsound: {err}\n{text}")
        assert first_bad_line(text) is None, text  # and a prefix of some program Python's grammar takes
    free = generate(fim_code_run, tmp_path / "f", *base, "constrain=false")
    redrawn = generate(fim_code_run, tmp_path / "r", *base, "constrain=false", "resample_invalid=3")
    invalid = round((1 - free["metrics"]["code/parse_rate"]) * 6)
    assert redrawn["invalid_after_resampling"] <= invalid
    assert (redrawn["resampled"] > 0) == (invalid > 0)
    # each report's parse rate is the share of its written samples that Python's own parser accepts;
    # one unconstrained token after a whole statement: some samples parse, some do not
    short = generate(
        fim_code_run, tmp_path / "s", "n=6", "max_new_tokens=1", "prompt=x = 1\n", "seed=3", "constrain=false"
    )
    assert 0 < share_parsing(tmp_path / "s") < 1
    for folder, result in (("c", report), ("f", free), ("r", redrawn), ("s", short)):
        assert result["metrics"]["code/parse_rate"] == share_parsing(tmp_path / folder), folder


def test_an_unfinished_constrained_sample_ends_on_its_last_complete_statement(fim_code_run, tmp_path):
    """unfinished=auto (constrain=true): a sample the length cap cut mid-statement is written up to
    the most of its new tokens that make a program that parses (cut_tokens counts the rest, the end
    stays `length`); unfinished=keep writes it as drawn, the same tokens up to the cut."""
    base = ["n=6", "max_new_tokens=24", "prompt=x = 1\n", "seed=5"]
    cut = generate(fim_code_run, tmp_path / "cut", *base)
    kept = generate(fim_code_run, tmp_path / "keep", *base, "unfinished=keep")
    assert share_parsing(tmp_path / "cut") == 1.0  # the prompt alone parses: a valid prefix always exists
    assert share_parsing(tmp_path / "keep") < 1.0  # this seed leaves some mid-statement
    assert cut["metrics"]["code/cut_unfinished_share"] == pytest.approx(1 - share_parsing(tmp_path / "keep"))
    assert kept["metrics"]["code/cut_unfinished_share"] == 0
    ends = [x.split("\t") for x in (tmp_path / "cut" / "syntax_report.tsv").read_text().splitlines()]
    assert all(x[2] in ("eos", "length") for x in ends if not x[0].startswith("#"))
    for i in range(6):
        whole = (tmp_path / "keep" / f"sample_{i:03d}.py").read_text().split("\n", 1)[1]
        short = (tmp_path / "cut" / f"sample_{i:03d}.py").read_text().split("\n", 1)[1]
        assert whole.startswith(short)  # the same draw, ended earlier
    cuts = [x for x in ends if len(x) == 4]
    assert all(x[1] == "ok" and x[2] == "length" and int(x[3].split()[1]) > 0 for x in cuts)
    assert len(cuts) == round(6 * cut["metrics"]["code/cut_unfinished_share"]) > 0


def test_the_cut_judges_prompt_and_sample_together_and_spares_exact_lengths(fim_code_run, tmp_path):
    """With include_prompt=false the file holds only the new text (an indented body never parses
    alone): the cut still ends each sample where prompt + new text parse, never at nothing. A request
    for exactly max_new_tokens (min_new_tokens as large) is not cut."""
    import ast

    base = ["n=4", "max_new_tokens=20", "prompt=def f(x):\n    y = 1\n", "seed=7"]
    prompt = "def f(x):\n    y = 1\n"
    generate(fim_code_run, tmp_path / "body", *base, "include_prompt=false")
    generate(fim_code_run, tmp_path / "whole", *base)
    generate(fim_code_run, tmp_path / "keep", *base, "include_prompt=false", "unfinished=keep")
    bodies = []
    for i in range(4):
        body = (tmp_path / "body" / f"sample_{i:03d}.py").read_text().split("\n", 1)[1]
        whole = (tmp_path / "whole" / f"sample_{i:03d}.py").read_text().split("\n", 1)[1]
        drawn = (tmp_path / "keep" / f"sample_{i:03d}.py").read_text().split("\n", 1)[1]
        assert whole == prompt + body and drawn.startswith(body)  # the same cut, with or without prompt
        ast.parse(prompt + body)  # prompt + what was kept: a program
        bodies.append(body)
    assert any(bodies)  # judged alone, an indented body never parses: every one would be cut to nothing
    exact = generate(fim_code_run, tmp_path / "exact", *base, "min_new_tokens=20")
    assert exact["metrics"]["code/cut_unfinished_share"] == 0
    # a sample that found no sound token inside a narrow nucleus ended short of its own end too: it is
    # cut the same way (as drawn, some such samples do not parse uncut); one the length ended with no
    # prefix that parses has no place to be cut
    narrow = ["n=6", "max_new_tokens=40", "prompt=x = 1\n", "seed=1", "top_p=0.3"]
    cut = generate(fim_code_run, tmp_path / "narrow", *narrow)
    kept = generate(fim_code_run, tmp_path / "narrow_keep", *narrow, "unfinished=keep")
    assert cut["metrics"]["code/end_no_valid_token_share"] > 0
    parse_rate = "code/end_no_valid_token_parse_rate"
    assert cut["metrics"][parse_rate] == 1.0 > kept["metrics"][parse_rate]
    assert share_parsing(tmp_path / "narrow") > share_parsing(tmp_path / "narrow_keep")
    assert kept["metrics"]["code/end_no_valid_token_share"] == cut["metrics"]["code/end_no_valid_token_share"]


def test_longest_valid_looks_at_line_ends_then_inside_the_next_line():
    from multiar.commands.sample_draw import longest_valid

    text = "a = 1\nb = 2\nc = (3"  # one character a token; valid where the text parses
    valid = [k for k in range(len(text) + 1) if share_of([text[:k]]) == 1]
    asked: list[int] = []

    def check(k: int) -> bool:
        asked.append(k)
        return k in valid

    found = longest_valid(len(text), check, lambda k: k == 0 or text[k - 1] == "\n")
    assert found == max(k for k in valid if k < len(text))  # "... c " : mid-line, after a line end
    assert text[:found].endswith("c ") and len(asked) < len(text) // 2  # not every position asked
    assert longest_valid(5, lambda k: False, lambda k: True) is None
    assert longest_valid(5, lambda k: k == 0, lambda k: True) is None  # never cut to no new token


def share_of(texts: list[str]) -> float:
    """The share of texts ast.parse takes (its SyntaxWarnings silenced)."""
    import ast
    import warnings

    ok = 0
    for text in texts:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", SyntaxWarning)
                ast.parse(text)
            ok += 1
        except SyntaxError:
            pass
    return ok / len(texts)


def share_parsing(folder: Path) -> float:
    """The share of the sample files under folder whose code (after the provenance line) ast.parse takes."""
    files = sorted(folder.glob("sample_*.py"))
    return share_of([f.read_text(encoding="utf-8").split("\n", 1)[1] for f in files])


def test_fim_cuts_a_long_document_into_pieces_that_fit_a_window():
    fim_ids = (900, 901, 902)
    doc = list(range(3, 103))  # 100 ids, windows of 32
    out = transform_documents(
        ["k"], [[50, *doc]], fim_ids, rate=1.0, spm_rate=0.5, seed=0, keep_front=[50], max_len=31
    )
    assert len(out) == 4 and all(len(piece) + 2 <= 33 for piece in out)  # + BOS and EOS: one window
    assert all(piece[0] == 50 and 901 in piece for piece in out)
    assert [i for piece in out for i in reassemble(piece[1:], fim_ids)] == doc


def test_the_stateful_constraint_rolls_back_under_speculative_decoding(fim_code_run):
    """Rejected draft tokens roll the constraint's cached state back: greedy speculative decoding under
    the constraint writes exactly what greedy decoding under it writes, row by row."""
    from multiar.engine.decode import generate
    from multiar.engine.sampling import ban_tokens
    from multiar.engine.speculative import speculative_generate
    from multiar.run_folder import load_run

    run = load_run(fim_code_run)
    domain = run.domain
    prompts = [
        domain.prompt_ids(p) for p in ("def f(x):\n    return (x", "import os\n\nclass A:\n    ", "x = [1,")
    ]
    common = dict(temperature=0.0, eos_id=domain.eos_id)
    plain = generate(
        run.model,
        prompts=prompts,
        max_new_tokens=40,
        processors=[ban_tokens([0, 1]), domain.constraint()],
        **common,
    )
    for draft in ("ngram", run.model):
        fast, stats = speculative_generate(
            run.model,
            prompts,
            40,
            draft=draft,
            k=4,
            processors=[ban_tokens([0, 1]), domain.constraint()],
            **common,
        )
        assert fast == plain
        rate = stats.as_dict()["acceptance_rate"]
        assert 0 < rate < 1 if draft == "ngram" else rate > 0  # ngram drafts get rejected: rollbacks ran


def test_the_saved_domain_keeps_every_setting_and_old_folders_still_load(tmp_path):
    """Every constructor setting is saved with the run and reloaded (a resumed or fine-tuned run reads
    the same files, tokenized the same way); a domain/ folder written before the settings were all
    kept still loads, with the defaults."""
    import inspect

    from multiar.domains import load_domain
    from multiar.domains.code.domain import CodeDomain

    settings = {
        "vocab_size": 300,
        "min_frequency": 3,
        "max_file_bytes": 60,
        "suffixes": [".py", ".pyi"],
        "require_parse": False,
        "fim_rate": 0.25,
        "fim_spm_rate": 0.75,
    }
    # a setting added to the constructor must be added here (and to save/load)
    assert set(inspect.signature(CodeDomain.__init__).parameters) - {"self", "tokenizer"} == set(settings)
    domain = build_domain("code", settings)
    domain.fit(["def f(x):\n    return x + 1\n"] * 20)
    domain.save(tmp_path / "d")
    loaded = load_domain("code", tmp_path / "d")
    kept = {k: getattr(loaded, "target_vocab_size" if k == "vocab_size" else k) for k in settings}
    assert kept == {**settings, "suffixes": (".py", ".pyi")}
    big = tmp_path / "big.py"
    big.write_text("x = 1\n" * 20)  # 120 bytes: over the run's max_file_bytes
    with pytest.raises(ValueError, match="over max_file_bytes=60"):
        list(loaded.read(big))

    # a folder from before: code.json with the four settings it held then, or none at all
    old = json.loads((tmp_path / "d" / "code.json").read_text())
    for keep in (["suffixes", "require_parse", "fim_rate", "fim_spm_rate"], None):
        if keep is None:
            (tmp_path / "d" / "code.json").unlink()
        else:
            (tmp_path / "d" / "code.json").write_text(json.dumps({k: old[k] for k in keep}))
        loaded = load_domain("code", tmp_path / "d")
        assert loaded.max_file_bytes == 1_000_000 and loaded.vocab_size == domain.vocab_size
        assert loaded.encode("def g(y):\n    return y\n") == domain.encode("def g(y):\n    return y\n")


def test_special_token_text_inside_a_file_is_encoded_as_text(tmp_path):
    """A file holding `<eos>`, `<pad>`, `<fim_middle>` ... as text round-trips byte for byte, and its ids
    hold no special id (PAD would fall out of the loss, decode would delete it), fitted or reloaded."""
    from multiar.domain import FIM_TOKENS
    from multiar.domains import load_domain
    from multiar.domains.code.domain import SPECIALS

    domain = build_domain("code", {"vocab_size": 400, "fim_rate": 0.5})
    texts = [f.read_text(encoding="utf-8") for f in bundled_files("code", 10)]
    domain.fit(texts)
    special = set(range(len(SPECIALS))) | set(domain.fim_ids)
    assert len(special) == len(SPECIALS) + len(FIM_TOKENS)
    text = "".join(f"s{i} = '{t}'\n" for i, t in enumerate(SPECIALS + FIM_TOKENS)) + "# a<eos>b<pad>\n"
    domain.save(tmp_path / "d")
    for d in (domain, load_domain("code", tmp_path / "d")):
        ids = d.encode(text)
        assert not special & set(ids)
        assert d.decode(ids) == (text, 0)
