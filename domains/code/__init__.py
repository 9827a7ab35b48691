"""Python source: byte-level BPE (HF tokenizers), a lexical constraint for sampling, parse and copy metrics."""

from multiar.domains.code.domain import CodeDomain

__all__ = ["CodeDomain"]
