"""Syntax-constrained sampling for Python: a logits processor that keeps every sample lexically and grammatically sound.

A small incremental scanner follows the text as it is written: strings (quotes, triple quotes,
prefixes), comments, the stack of open brackets and the stack of indentation levels. For the few most
likely next tokens it scans only the candidate's characters from the row's state and rejects one
that closes the wrong bracket, breaks a single-quoted string with a newline, indents without a ':'
before, dedents to no enclosing level, mixes tabs and spaces in an indent, or holds a character Python
has no token for; a candidate that ends a logical line also has that line run through Python's own
`tokenize`. On top of it, Python's grammar (domains/code/grammar.py, lark's LALR tables) checks that
the text is still the start of some program. EOS is allowed only where the whole sample parses.

`PythonConstraint.sound(ids, token)` runs both for one token; the decode loop asks it of every token it
draws and draws again without an unsound one (multiar/engine/checked_draw.py), so no row is ever left
unconstrained. The state of each row is kept per ids prefix (a speculative draft rolled back, another
row, a server's slot), so the check stays a function of its input.
"""

from __future__ import annotations

import io
import tokenize
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import NamedTuple

from torch import Tensor

from multiar.domains.code.analysis import parses
from multiar.domains.code.grammar import Parse, Ungrammatical, first_bad_line
from multiar.engine.prefix_states import PrefixStates
from multiar.engine.sampling import ban_tokens
from multiar.errors import ConfigError

OPEN, CLOSE = "([{", ")]}"
NO_TOKEN = set("$?`")


class Unsound(ValueError):
    """The text cannot be the start of a Python program."""


@dataclass
class Lexer:
    """Where the scan of a Python text stands."""

    brackets: list[str] = field(default_factory=list)
    indents: list[str] = field(default_factory=lambda: [""])
    quote: str = ""  # the open string's quote: ', ", \'\'\' or \"\"\"; "" outside strings
    opening: int = 0  # quote characters seen in a row where a string may start ('' or a triple)
    closing: int = 0  # quote characters seen in a row inside a triple-quoted string
    escape: bool = False  # the last character was a backslash inside a string
    comment: bool = False
    line_start: bool = True  # nothing but whitespace on this physical line yet (outside brackets)
    indent: str = ""  # the whitespace at the start of this line so far
    block_opened: bool = False  # the last logical line ended with ':' (a block must follow)
    last: str = ""  # the last character of code (not whitespace, not in a comment)
    continued: bool = False  # a backslash continues the logical line
    logical: str = ""  # the logical line being written (run through tokenize when it ends)

    def copy(self) -> Lexer:
        return replace(self, brackets=list(self.brackets), indents=list(self.indents))

    def feed(self, text: str) -> Lexer:
        for ch in text:
            self._char(ch)
        return self

    def _char(self, ch: str) -> None:
        if self.opening:  # after 1 or 2 quote characters: a string, an empty string, or a triple quote
            q = self.logical[-1]
            if ch == q and self.opening == 1:
                self.opening, self.logical = 2, self.logical + ch
                return
            if ch == q and self.opening == 2:  # a triple quote opens
                self.opening, self.quote, self.logical = 0, q * 3, self.logical + ch
                return
            if self.opening == 2:  # '' was an empty string: this character is code again
                self.opening = 0
            else:  # a one-quote string holds this character
                self.opening, self.quote = 0, q
                self._in_string(ch)
                return
        if self.comment:
            if ch == "\n":
                self.comment = False
                self._newline()
            return
        if self.quote:
            self._in_string(ch)
            return
        if self.line_start and ch in " \t":
            self.indent += ch
            return
        if ch == "\n":
            self._newline()
            return
        if ch == "#":
            self.comment = True
            return
        if self.line_start:
            self._begin_line()
        self.logical += ch
        if ch in "'\"":
            self.opening = 1
        elif ch in OPEN:
            self.brackets.append(ch)
        elif ch in CLOSE:
            if not self.brackets or OPEN.index(self.brackets[-1]) != CLOSE.index(ch):
                raise Unsound(f"{ch!r} closes {self.brackets[-1] if self.brackets else 'nothing'}")
            self.brackets.pop()
        elif ch in NO_TOKEN:
            raise Unsound(f"{ch!r} is no Python token")
        self.continued = ch == "\\"
        if not ch.isspace():
            self.last = ch

    def _in_string(self, ch: str) -> None:
        self.logical += ch
        if self.escape:
            self.escape = False
        elif ch == "\\":
            self.escape = True
        elif ch == "\n" and len(self.quote) == 1:
            raise Unsound("newline inside a single-quoted string")
        elif ch == self.quote[0]:
            self.closing += 1
            if self.closing == len(self.quote):
                self.quote, self.closing, self.last = "", 0, ch
            return
        self.closing = 0

    def _begin_line(self) -> None:
        """The first character of a logical line: its indentation against the open blocks."""
        self.line_start = False
        indent, current = self.indent, self.indents[-1]
        if " " in indent and "\t" in indent:
            raise Unsound("tabs and spaces mixed in one indentation")
        if self.block_opened:
            if not (len(indent) > len(current) and indent.startswith(current)):
                raise Unsound("a block after ':' must be indented")
            self.indents.append(indent)
            self.block_opened = False
        elif indent != current:
            if len(indent) > len(current):
                raise Unsound("unexpected indent")
            if indent not in self.indents:
                raise Unsound("unindent to no enclosing level")
            while self.indents[-1] != indent:
                self.indents.pop()

    def _newline(self) -> None:
        if self.line_start:  # a blank or comment-only line says nothing about blocks
            self.indent = ""
            return
        if self.brackets or self.continued:  # the logical line goes on
            self.continued = False
            self.logical += "\n"
            return
        check_line(self.logical)
        self.block_opened = self.last == ":"
        self.line_start, self.indent, self.last, self.logical = True, "", "", ""

    def could_end(self) -> bool:
        """Whether the text may stop here as far as the scan sees: no open string, bracket or block."""
        return not (self.quote or self.opening == 1 or self.brackets or self.continued or self.block_opened)


def check_line(line: str) -> None:
    """A complete logical line must tokenize without error tokens."""
    try:
        for tok in tokenize.generate_tokens(io.StringIO(line.strip() + "\n").readline):
            if tok.type == tokenize.ERRORTOKEN and not tok.string.isspace():
                raise Unsound(f"tokenize rejects {tok.string!r}")
    except (tokenize.TokenError, SyntaxError) as err:  # SyntaxError: IndentationError and kin
        raise Unsound(str(err)) from None


def scan(text: str) -> Lexer:
    """The state after text; Unsound when text cannot start a Python program."""
    return Lexer().feed(text)


class RowState(NamedTuple):
    """A row's text as the scanner and the grammar see it (lexer copied before it is fed; parse immutable)."""

    lexer: Lexer
    parse: Parse


class BadPrompt(NamedTuple):
    """A row's text that no continuation makes a program: the 1-based line where it goes wrong."""

    line: int


class PythonConstraint:
    """The processor: as a logits processor it bans the special tokens (EOS excepted); `sound(ids, token)`
    says whether the row's text followed by token is still a viable prefix of a Python program, by the
    scanner (brackets, strings, indentation) and the grammar (domains/code/grammar.py), EOS only where
    final_text(ids) parses. The decode loop asks `sound` of the tokens it draws (multiar/engine/
    checked_draw.py). decode_tail(ids): the text a row holds (its prompt included); token_texts[i]: the
    text token i adds; final_text(ids): the text the sample would be if it ended here (default
    decode_tail; for fill-in-the-middle, prefix + middle + suffix). A row's state is kept per ids
    prefix, so the check is a function of the ids it is given (rows, rollbacks, slots)."""

    def __init__(
        self,
        decode_tail: Callable[[list[int]], str],
        token_texts: list[str],
        eos_id: int,
        banned: set[int],
        final_text: Callable[[list[int]], str] | None = None,
    ) -> None:
        self.decode_tail, self.texts, self.eos_id = decode_tail, token_texts, eos_id
        self.banned = sorted(banned)
        self.ban_specials = ban_tokens(self.banned)  # one index_fill_, its index kept per device
        self.final_text = final_text or decode_tail
        self.states: PrefixStates[RowState | BadPrompt | None] = PrefixStates(
            self.build, self.extend, keep=256
        )
        # the state after (a state, a token) that `sound` found: the drawn token's state is asked for
        # again by the row's next call (states.state_of); the key's state is kept with it, so its id is
        # not reused while the entry lives
        self.after: OrderedDict[tuple[int, int], tuple[RowState, RowState | None]] = OrderedDict()

    def build(self, ids: list[int]) -> RowState | BadPrompt:
        text = lf_lines(self.decode_tail(ids))
        try:
            return RowState(scan(text), Parse.begin().advance(text))
        except (Unsound, Ungrammatical):
            return BadPrompt(first_bad_line(text) or first_unsound_line(text))

    def extend(self, state: RowState | BadPrompt | None, new: list[int]) -> RowState | None:
        if not isinstance(state, RowState):
            return None
        if len(new) == 1 and (known := self.after.get((id(state), new[0]))) and known[0] is state:
            return known[1]
        return self.step(state, lf_lines("".join(self.texts[i] for i in new)))

    @staticmethod
    def step(state: RowState, text: str) -> RowState | None:
        """The state after text, or None when text makes the row unsound."""
        try:
            return RowState(state.lexer.copy().feed(text), state.parse.advance(text))
        except (Unsound, Ungrammatical):
            return None

    def __call__(self, ids: Tensor, logits: Tensor) -> Tensor:
        for row in ids.tolist():  # a prompt no continuation can make valid stops here, before sampling
            if isinstance(bad := self.states.state_of(row), BadPrompt):
                raise ConfigError(
                    f"prompt line {bad.line}: no continuation makes this a valid Python program "
                    "(constrain=true checks Python syntax; fix the prompt or set constrain=false)"
                )
        if self.banned:
            logits = self.ban_specials(ids, logits)
        return logits

    def sound(self, ids: list[int], token: int) -> bool:
        """Whether ids followed by token can still become a valid program (EOS: whether it is one)."""
        if token == self.eos_id:
            return parses(self.final_text(ids))
        if token in self.banned or not 0 <= token < len(self.texts) or not self.texts[token]:
            return False
        if "\r" in self.texts[token]:  # a line end to Python (and to a text-mode reader), not to the scan:
            return False  # samples end their lines with LF only
        state = self.states.state_of(ids)
        if not isinstance(state, RowState):
            return False
        after = self.step(state, self.texts[token])
        self.after[(id(state), token)] = (state, after)
        if len(self.after) > 512:
            self.after.popitem(last=False)
        return after is not None


def lf_lines(text: str) -> str:
    """text with CRLF and lone CR line ends as LF, as Python's tokenizer reads them."""
    return text.replace("\r\n", "\n").replace("\r", "\n")


def first_unsound_line(text: str) -> int:
    """The 1-based line where the scanner first refuses text (1 when it refuses none)."""
    lexer = Lexer()
    for number, line in enumerate(text.splitlines(keepends=True), start=1):
        try:
            lexer.feed(line)
        except Unsound:
            return number
    return 1


def python_constraint(
    decode_tail: Callable[[list[int]], str],
    token_texts: list[str],
    eos_id: int,
    banned: set[int],
    final_text: Callable[[list[int]], str] | None = None,
) -> PythonConstraint:
    """The processor with its per-token check (PythonConstraint)."""
    return PythonConstraint(decode_tail, token_texts, eos_id, banned, final_text)
