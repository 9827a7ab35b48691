"""Python's grammar as a viable-prefix check: whether a text can still become a program that parses.

The grammar is lark's Python 3 grammar (lark/grammars/python.lark), compiled once per process to LALR
tables (lark's own file cache keeps them between processes). Lark's interactive parser is not used: it
keeps the indenter's state on the post-lexer object, shares lexer state between copies (before its
2026 fix) and deep-copies the value stack on every copy. Here a parse is an immutable value: LALR
state stacks as linked tuples (a step shares everything below the top), the indentation levels, the
bracket depth and the text of the last token, which may still grow (`retu` of `return`, `1e` of
`1e5`, an open string). Advancing by a piece of text lexes that tail and the new text with lark's
scanner, feeds every token that can no longer change to the tables (NEWLINE, INDENT and DEDENT as
lark's PythonIndenter would make them) and keeps the rest as the new tail, which is sound when some
terminal the parser accepts can start with it (regex partial matching). Python's hard keywords are
always keywords; soft ones (`match`, `case`, `_`) are tried both as keyword and name, each reading a
stack of its own until one dies.
"""

from __future__ import annotations

import keyword
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import regex
from lark import Lark
from lark.indenter import PythonIndenter
from lark.lexer import PatternStr
from lark.parsers.lalr_analysis import Shift
from lark.utils import TextSlice

NEWLINE, INDENT, DEDENT, NAME = "_NEWLINE", "_INDENT", "_DEDENT", "NAME"
OPENERS, CLOSERS = frozenset({"LPAR", "LSQB", "LBRACE"}), frozenset({"RPAR", "RSQB", "RBRACE"})
TAB = 8  # lark's PythonIndenter: a tab counts as 8 columns
MAX_READINGS = 8  # soft keywords read both ways: at most this many stacks at once

Stack = tuple  # (LALR state, the stack below) ... ending in None


class Ungrammatical(ValueError):
    """The text cannot be the start of a program Python's grammar accepts."""


@dataclass(frozen=True)
class Tables:
    """What the check needs from lark, built once: the LALR actions, the scanner, the terminals."""

    states: dict[int, dict[str, tuple[Any, Any]]]
    start: int
    scanner: Any  # lark's Scanner: match(TextSlice, pos) -> (text, terminal) or None
    ignored: frozenset[str]
    literals: dict[str, str]  # terminal -> its fixed text (operators, keywords)
    patterns: dict[str, Any]  # terminal -> compiled regex (names, numbers, strings, newlines)
    keywords: dict[str, str]  # keyword text -> its terminal


@lru_cache(maxsize=1)
def tables() -> Tables:
    """lark's Python grammar as LALR tables (about a second the first time; lark's cache after)."""
    lark = Lark.open_from_package(
        "lark", "python.lark", ["grammars"], parser="lalr", lexer="basic",
        postlex=PythonIndenter(), start="file_input", cache=True,
    )  # fmt: skip
    basic = lark.parser.lexer.lexer
    table = lark.parser.parser.parser.parse_table
    literals = {t.name: t.pattern.value for t in lark.terminals if isinstance(t.pattern, PatternStr)}
    patterns = {
        t.name: regex.compile(t.pattern.to_regexp())
        for t in lark.terminals
        if not isinstance(t.pattern, PatternStr)
    }
    for name in basic.ignore_types:  # Python allows nothing between a continuation's backslash and newline
        if name in patterns and patterns[name].pattern.startswith("\\\\"):
            patterns[name] = regex.compile(r"\\\n")
    keywords = {v: k for k, v in literals.items() if regex.fullmatch(r"[^\W\d]\w*", v)}
    return Tables(
        table.states, table.start_states["file_input"], basic.scanner, frozenset(basic.ignore_types),
        literals, patterns, keywords,
    )  # fmt: skip


def shift(t: Tables, stack: Stack, terminal: str) -> Stack | None:
    """stack after reading terminal (its reductions, then the shift); None when the grammar refuses it."""
    states = t.states
    while True:
        action = states[stack[0]].get(terminal)
        if action is None:
            return None
        kind, arg = action
        if kind is Shift:
            return (arg, stack)
        for _ in arg.expansion:
            stack = stack[1]
        stack = (states[stack[0]][arg.origin.name][1], stack)


def readings(t: Tables, stacks: tuple[Stack, ...], terminals: tuple[str, ...]) -> tuple[Stack, ...]:
    """Every stack after reading any of terminals (one token that may be read several ways)."""
    out = [s for stack in stacks for term in terminals if (s := shift(t, stack, term)) is not None]
    return tuple(out[:MAX_READINGS])


def name_terminals(t: Tables, text: str) -> tuple[str, ...]:
    """How a name-like token reads: a hard keyword as its keyword, a soft one both ways, else a name."""
    term = t.keywords.get(text)
    if term is None:
        return (NAME,)
    return (term,) if keyword.iskeyword(text) else (term, NAME)


STARTS_KEEP = 1 << 16  # could_start's answers kept (the dict starts again when full)
# text -> (the terminals some text starting with it can be, could_start's answer); read and written by
# the engine thread and a check worker at once: single gets and sets only
_starts: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {}


def could_start(text: str) -> tuple[str, ...]:
    """The terminals whose text can be `text` or start with it (it may still grow), as `starts_with`
    judges. Only terminals that can begin with a prefix of text can begin with text, so the longest
    prefix seen before (up to 64 characters back) narrows the search: a name or string that grows a
    token at a time is matched against a few terminals, not all of them."""
    known = _starts.get(text)
    if known is not None:
        return known[1]
    t = tables()
    candidates: tuple[str, ...] = (*t.literals, *t.patterns)
    for k in range(len(text) - 1, max(len(text) - 64, 0), -1):
        prior = _starts.get(text[:k])
        if prior is not None:
            candidates = prior[0]
            break
    begins = tuple(kind for kind in candidates if can_begin(t, kind, text))
    found = tuple(kind for kind in begins if starts_with(t, kind, text))
    if len(_starts) >= STARTS_KEEP:
        _starts.clear()
    _starts[text] = (begins, found)
    return found


def can_begin(t: Tables, kind: str, text: str) -> bool:
    """Whether some text of terminal kind starts with `text` (true of every prefix of it too, which
    `starts_with` is not: regex's partial match takes `1` of `1_` as DEC_NUMBER's whole match)."""
    literal = t.literals.get(kind)
    if literal is not None:
        return literal.startswith(text)
    return t.patterns[kind].fullmatch(text, partial=True) is not None


def starts_with(t: Tables, kind: str, text: str) -> bool:
    """Whether terminal kind's text can be `text` or start with it, as the check has always judged it
    (a partial match, or a whole match of all of text)."""
    literal = t.literals.get(kind)
    if literal is not None:
        return literal.startswith(text)
    m = t.patterns[kind].match(text, partial=True)
    return m is not None and (m.partial or m.end() == len(text))


def could_grow(t: Tables, text: str) -> bool:
    """Whether text, more than one token now, can still be the start of a single token (`1e`, `..`, `b'x`)."""
    if any(v.startswith(text) for v in t.literals.values()):
        return True
    return any((m := p.match(text, partial=True)) is not None and m.partial for p in t.patterns.values())


@dataclass(frozen=True)
class Parse:
    """Where a viable prefix stands: the parser's stacks (one per reading), the indentation levels, the
    bracket depth and the tail (the text of the last token, which may still grow)."""

    stacks: tuple[Stack, ...]
    indents: tuple[int, ...] = (0,)
    parens: int = 0
    tail: str = ""

    @classmethod
    def begin(cls) -> Parse:
        return cls(((tables().start, None),))

    def advance(self, text: str) -> Parse:
        """The parse after text; Ungrammatical when no program starts with what was read."""
        t = tables()
        s = self.tail + text
        tokens, pos = lex(t, s)
        cut = pos if pos < len(s) else (tokens[-1][0] if tokens else len(s))
        head = [tok for tok in tokens if tok[0] < cut]
        while head and could_grow(t, s[head[-1][0] :]):
            cut = head.pop()[0]
        parse = self
        for start, value, kind in head:
            parse = parse.read(t, value, kind)
            if not parse.stacks:
                raise Ungrammatical(f"{value!r} cannot follow {s[:start][-40:]!r}")
        tail = s[cut:]
        if tail and not parse.viable_tail(t, s, cut, [tok for tok in tokens if cut <= tok[0]]):
            raise Ungrammatical(f"no token the grammar accepts next starts with {tail!r}")
        return Parse(parse.stacks, parse.indents, parse.parens, tail)

    def viable_tail(self, t: Tables, s: str, cut: int, tokens: list[tuple[int, str, str]]) -> bool:
        """Whether the tail s[cut:] (its tokens still open to regrouping: `..` may become `...` or stay
        two dots) can go on: as one growing token, or its first tokens read and the rest growing."""
        parse, at = self, cut
        for start, value, kind in tokens:
            if parse.may_start(t, s[start:]):
                return True
            if start + len(value) >= len(s):
                return False
            parse = parse.read(t, value, kind)
            if not parse.stacks:
                return False
            at = start + len(value)
        return at < len(s) and parse.may_start(t, s[at:])

    def read(self, t: Tables, value: str, kind: str) -> Parse:
        """The parse after one finished token (no stacks left: the grammar refuses it)."""
        if kind in t.ignored:
            return self
        if kind == NEWLINE:
            return self if self.parens else self.newline(t, value)
        terms = name_terminals(t, value) if kind == NAME else (kind,)
        parens = max(self.parens + (kind in OPENERS) - (kind in CLOSERS), 0)
        return Parse(readings(t, self.stacks, terms), self.indents, parens, "")

    def newline(self, t: Tables, value: str) -> Parse:
        """A logical line ends: NEWLINE, then INDENT or DEDENTs to the next line's indentation."""
        stacks, indents = readings(t, self.stacks, (NEWLINE,)), list(self.indents)
        if "\n" in value:
            margin = value.rsplit("\n", 1)[1]
            width = margin.count(" ") + TAB * margin.count("\t")
            if width > indents[-1]:
                indents.append(width)
                stacks = readings(t, stacks, (INDENT,))
            while width < indents[-1]:
                indents.pop()
                stacks = readings(t, stacks, (DEDENT,))
            if width != indents[-1]:
                stacks = ()  # a dedent to no enclosing level
        return Parse(stacks, tuple(indents), self.parens, "")

    def may_start(self, t: Tables, tail: str) -> bool:
        """Whether the unfinished last token can become one the grammar accepts here."""
        for kind in could_start(tail):
            if kind in t.ignored or (kind == NEWLINE and self.parens):
                return True
            if readings(t, self.stacks, (kind,)):
                return True
        return False


def lex(t: Tables, s: str) -> tuple[list[tuple[int, str, str]], int]:
    """lark's tokens of s as (start, text, terminal), and where the scan stopped (len(s), or the start
    of text no terminal matches yet: an open string, a lone backslash, `!`)."""
    tokens, pos, text = [], 0, TextSlice(s, 0, len(s))
    while pos < len(s):
        m = t.scanner.match(text, pos)
        if m is None or not m[0]:
            break
        tokens.append((pos, m[0], m[1]))
        pos += len(m[0])
    return tokens, pos


def first_bad_line(text: str) -> int | None:
    """The 1-based line of text where it stops being a viable prefix, or None when it is one."""
    parse = Parse.begin()
    for number, line in enumerate(text.splitlines(keepends=True), start=1):
        try:
            parse = parse.advance(line)
        except Ungrammatical:
            return number
    return None
