"""The code domain's grammar-level constraint (domains/code/grammar.py, syntax.py): lark's Python grammar
as a viable-prefix check. Real code is never refused; what no program can start with is."""

from __future__ import annotations

import random
import sysconfig
from pathlib import Path

import pytest
import torch

from multiar.domains.code.grammar import Parse, Ungrammatical, first_bad_line
from multiar.domains.code.syntax import PythonConstraint
from multiar.engine.checked_draw import TokenCheck
from multiar.errors import ConfigError

# 50 standard-library files of 500 B to 12 kB, drawn with random.Random(22) from the sorted list of
# Python 3.11's library files of that size (tests and site-packages left out); ones another Python
# version lacks are skipped
STDLIB_FILES = [
    "asynchat.py", "asyncio/__main__.py", "asyncio/subprocess.py", "asyncio/taskgroups.py", "bisect.py",
    "config-3.11-x86_64-linux-gnu/python-config.py", "distutils/command/__init__.py",
    "distutils/command/build_clib.py", "distutils/command/upload.py", "distutils/config.py",
    "email/mime/base.py", "email/mime/image.py", "email/mime/multipart.py", "email/parser.py",
    "encodings/hz.py", "encodings/iso2022_jp_3.py", "encodings/oem.py", "encodings/raw_unicode_escape.py",
    "encodings/shift_jis.py", "encodings/shift_jis_2004.py", "encodings/utf_16_be.py", "getpass.py",
    "hmac.py", "idlelib/autoexpand.py", "idlelib/codecontext.py", "idlelib/filelist.py",
    "idlelib/zoomheight.py", "importlib/resources/__init__.py", "importlib/resources/abc.py",
    "importlib/resources/readers.py", "lib2to3/btm_matcher.py", "lib2to3/fixes/fix_reload.py",
    "lib2to3/fixes/fix_unicode.py", "lib2to3/pgen2/literals.py", "multiprocessing/context.py",
    "multiprocessing/popen_spawn_posix.py", "multiprocessing/resource_sharer.py",
    "multiprocessing/spawn.py", "pipes.py", "re/_casefix.py", "tkinter/dialog.py", "tty.py",
    "turtledemo/nim.py", "turtledemo/planet_and_moon.py", "turtledemo/sorting_animate.py",
    "turtledemo/two_canvases.py", "unittest/__init__.py", "uu.py", "wsgiref/headers.py", "wsgiref/util.py",
]  # fmt: skip


def char_constraint(eos: int = 0) -> tuple[PythonConstraint, list[str]]:
    """The constraint over a vocabulary of single characters (id 0: EOS), ids as the text's characters."""
    chars = [""] + [chr(c) for c in range(9, 127)]
    index = {c: i for i, c in enumerate(chars)}

    def text(ids: list[int]) -> str:
        return "".join(chars[i] for i in ids)

    constraint = PythonConstraint(text, chars, eos, set())
    constraint.index = index  # type: ignore[attr-defined]
    return constraint, chars


@pytest.mark.parametrize(
    "text", ["x = = 1", "def f(:", "return return\n", "else:\n", "x = 1\n  y = 2\n", "if x:\npass\n", "f(x))"]
)
def test_what_no_program_starts_with_is_refused(text):
    assert first_bad_line(text) is not None


@pytest.mark.parametrize(
    "text",
    [
        "x = 1e5; y = ...; s = b'ab' rb'x'\n",
        "match = re.match(x)\nfor _ in range(3):\n    pass\n",
        "match x:\n    case [1, *rest] if rest:\n        pass\n    case _:\n        pass\n",
        "def f(a, /, *, b=1, **k) -> int:\n    '''doc\n    more'''\n    return a if k else -b\n",
        "x = [\n 1,  # c\n 2]\n@property\ndef f(self): return self._x\n",
        "class A(B, metaclass=M):\n\tx: int = 0\n\n\tdef g(self):\n\t\tyield from (i async for i in y)\n",
        "retu",
        "x = 'unfinished",
        "if x:\n    y = (1 +\n",
    ],
)
def test_python_and_its_unfinished_prefixes_pass(text):
    assert first_bad_line(text) is None
    for cut in range(len(text)):  # every prefix of a viable prefix is one
        Parse.begin().advance(text[:cut])


def test_real_code_is_never_refused_at_any_position_of_50_stdlib_files():
    """At every position of each file the file's own next piece is allowed: pieces of 1 to 6 characters
    (every boundary a tokenizer can draw, split as BPE might), and EOS once the whole file is there."""
    root, rng, seen = Path(sysconfig.get_paths()["stdlib"]), random.Random(0), 0
    constraint, _ = char_constraint()
    for name in STDLIB_FILES:
        path = root / name
        if not path.exists():
            continue
        text, seen = path.read_text(encoding="utf-8"), seen + 1
        parse, at = Parse.begin(), 0
        while at < len(text):
            piece = text[at : at + rng.randint(1, 6)]
            try:
                parse = parse.advance(piece)
            except Ungrammatical as err:
                pytest.fail(f"{name} line {text[:at].count(chr(10)) + 1}: {err}")
            at += len(piece)
        assert (
            constraint.sound([constraint.index[c] for c in text if c in constraint.index], 0)
            or not text.isascii()
        )
    assert seen >= 40


def test_the_sound_check_is_per_row_and_per_prefix():
    """A row's answers do not depend on other rows asked in between (state per ids prefix), nor on
    what was asked before (a rolled-back draft)."""
    a, _ = char_constraint()
    b, chars = char_constraint()
    assert isinstance(a, TokenCheck)
    row1 = [a.index[c] for c in "def f(x):\n    return x"]
    row2 = [a.index[c] for c in "x = [1, 2"]
    alone = [a.sound(row1, t) for t in range(len(chars))]
    for t in range(len(chars)):  # interleaved with another row, and with a longer prefix of row 1
        b.sound(row2, t)
        b.sound(row1 + [b.index["+"]], t)
    assert [b.sound(row1, t) for t in range(len(chars))] == alone
    assert a.sound(row1, 0) and not a.sound(row2, 0)  # EOS only where the text parses
    assert a.sound(row2, a.index["]"]) and not a.sound(row2, a.index[")"]) and not a.sound(row2, a.index[":"])


def test_a_carriage_return_is_never_written_and_a_crlf_prompt_reads_as_lines():
    """Python (and a file read in text mode) ends a line at a lone CR: inside a single-quoted string it
    would be a syntax error the scan did not see, so no sample writes one; a prompt's CRLF line ends
    are read as LF."""
    c, _ = char_constraint()
    ids = [c.index[ch] for ch in "x = 'a"]
    assert c.sound(ids, c.index["b"]) and not c.sound(ids, c.index["\r"])
    assert not c.sound([c.index[ch] for ch in "x = 1"], c.index["\r"])
    crlf = [c.index[ch] for ch in "if x:\r\n    y = 1\r\n"]
    c(torch.tensor([crlf]), torch.zeros(1, 119))  # no BadPrompt: a valid program's start
    assert c.sound(crlf, c.index["z"])
    opened = [c.index[ch] for ch in "if x:\r\n"]  # the block needs an indented line first
    assert not c.sound(opened, c.index["z"]) and c.sound(opened, c.index[" "])


def test_the_state_sound_found_for_a_drawn_token_is_the_one_the_row_continues_from():
    """sound(ids, t) keeps the state after t; the row's next call (ids + [t]) takes it instead of
    advancing the grammar again, and every answer from it equals a fresh constraint's."""
    c, chars = char_constraint()
    fresh, _ = char_constraint()
    ids = [c.index[ch] for ch in "def f(x):\n    return x"]
    t = c.index["+"]
    assert c.sound(ids, t)
    kept = c.after[(id(c.states.state_of(ids)), t)][1]
    assert c.states.state_of(ids + [t]) is kept
    assert [c.sound(ids + [t], u) for u in range(len(chars))] == [
        fresh.sound(ids + [t], u) for u in range(len(chars))
    ]


def test_a_prompt_no_continuation_makes_valid_is_a_one_line_error():
    constraint, _ = char_constraint()
    ids = [constraint.index[c] for c in "import os\nx = = 1\n"]
    with pytest.raises(ConfigError, match="prompt line 2"):
        constraint(torch.tensor([ids]), torch.zeros(1, 119))


def test_a_random_model_under_the_constraint_writes_only_viable_prefixes():
    """An untrained GPT over single characters, sampled under the constraint: every sample stays a
    viable prefix, and one that ended with EOS parses."""
    from multiar.domains.code.analysis import parses
    from multiar.engine.decode import stream
    from multiar.engine.model import GPT, ModelConfig

    torch.manual_seed(0)
    constraint, chars = char_constraint()
    model = GPT(ModelConfig(vocab_size=len(chars), block_size=96, n_layer=1, n_head=2, n_embd=32)).eval()
    prompts = [[constraint.index[c] for c in p] for p in ("def f(x):\n    return ", "x = (", "import")]
    for temperature in (0.0, 1.0):
        new, ends = [[] for _ in prompts], [None] * len(prompts)
        gen = torch.Generator().manual_seed(0)
        for ev in stream(
            model, prompts, 60, temperature=temperature, eos_id=0, processors=[constraint], generator=gen
        ):
            if ev.token is None:
                ends[ev.row] = ev.end
            else:
                new[ev.row].append(ev.token)
        for p, ids, end in zip(prompts, new, ends, strict=True):
            text = "".join(chars[i] for i in p + ids)
            assert first_bad_line(text) is None, text
            assert end in ("eos", "length") and (end != "eos" or parses(text)), (end, text)


def test_could_start_from_a_prefix_answer_is_the_scan_over_every_terminal():
    """could_start narrows each text's terminals from its longest prefix answered before: the same
    answer as matching the text against every terminal, for every prefix of names, keywords, numbers,
    strings with prefixes, operators and the tails that may still grow (`1e`, `..`, `b'x`)."""
    from multiar.domains.code import grammar

    t = grammar.tables()

    def scan(text: str) -> tuple[str, ...]:
        return tuple(k for k in (*t.literals, *t.patterns) if grammar.starts_with(t, k, text))

    texts = ["returning", "return", "matcher", "1e5j", "0x_ff", "...", "b'x\\n'", 'rb"""doc', "f'{x}'",
             "**=", "->", "# note", "\\\n", "    ", "x1_y", "lambda", "async", "_", "é", "1_000", "1.e5",
             "0_0", ".5e3", "1.e+5", "1_0_0"]  # fmt: skip
    grammar._starts.clear()
    for text in texts:
        for n in range(1, len(text) + 1):  # each prefix in turn, as a growing tail asks
            assert grammar.could_start(text[:n]) == scan(text[:n]), text[:n]
    # where a prefix whole-matches a terminal (`1` of `1_`) that its longer text can still be: the
    # narrowing keeps the terminals a text can begin, not starts_with's answer
    assert grammar.can_begin(t, "DEC_NUMBER", "1_") and not grammar.starts_with(t, "DEC_NUMBER", "1_")
    assert "DEC_NUMBER" in grammar.could_start("1_0")
    grammar._starts.clear()
    for text in texts:  # and cold, the longest first
        assert grammar.could_start(text) == scan(text), text
