"""Syntax-constrained sampling for Python: a logits processor that keeps every sample lexically sound.

A small incremental scanner follows the text as it is written: strings (quotes, triple quotes,
prefixes), comments, the stack of open brackets and the stack of indentation levels. For the few most
likely next tokens it scans only the candidate's characters from the row's state and rejects one
that closes the wrong bracket, breaks a single-quoted string with a newline, indents without a ':'
before, dedents to no enclosing level, mixes tabs and spaces in an indent, or holds a character Python
has no token for; a candidate that ends a logical line also has that line run through Python's own
`tokenize`. EOS is allowed only where the text could end: no open string or bracket, no ':' without
its block, and the whole sample parses. Tokens outside the top candidates are banned, so a sample only takes checked steps.

The state of each row is rebuilt from the ids it is given whenever they are not an extension of the
ids of its last call (a speculative draft rolled back, another row), so the processor stays a function
of its input.
"""

from __future__ import annotations

import io
import tokenize
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from multiar.engine.prefix_states import PrefixStates

OPEN, CLOSE = "([{", ")]}"
NO_TOKEN = set("$?`")
TOP_K = 8


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


def python_constraint(
    decode_tail: Callable[[list[int]], str],
    token_texts: list[str],
    eos_id: int,
    banned: set[int],
    top_k: int = TOP_K,
    final_text: Callable[[list[int]], str] | None = None,
) -> Callable[[Tensor, Tensor], Tensor]:
    """The processor. decode_tail(ids): the text a row holds (its prompt included); token_texts[i]:
    the text token i adds; banned ids (specials) are never candidates. EOS is a candidate only where
    final_text(ids) parses: the text the sample would be if it ended here (default decode_tail; for
    fill-in-the-middle, prefix + middle + suffix)."""
    final_text = final_text or decode_tail
    from multiar.domains.code.analysis import parses

    def build(ids: list[int]) -> Lexer | None:
        try:
            return scan(decode_tail(ids))
        except Unsound:
            return None  # the text so far is unsound (a prompt): leave this row unconstrained

    def extend(lexer: Lexer | None, new: list[int]) -> Lexer | None:
        try:
            return None if lexer is None else lexer.copy().feed("".join(token_texts[i] for i in new))
        except Unsound:
            return None

    states = PrefixStates(build, extend)

    def processor(ids: Tensor, logits: Tensor) -> Tensor:
        top = logits.topk(min(top_k, logits.size(-1)), dim=-1).indices.tolist()
        allowed = torch.zeros_like(logits, dtype=torch.bool)
        for b, row in enumerate(ids.tolist()):
            lexer = states.state_of(row)
            ok = []
            for t in top[b] if lexer is not None else []:
                if t in banned:
                    continue
                if t == eos_id:
                    if parses(final_text(row)):
                        ok.append(t)
                    continue
                try:
                    lexer.copy().feed(token_texts[t])
                    ok.append(t)
                except Unsound:
                    pass
            if ok:
                allowed[b, ok] = True
            else:  # unconstrained row, or no checked candidate is sound: the model chooses
                allowed[b] = True
        return logits.masked_fill_(~allowed, float("-inf"))

    return processor
