"""Protein sequences: the amino-acid alphabet, FASTA through Bio.SeqIO, novelty and filters for designs."""

from multiar.domains.protein.domain import ProteinDomain

__all__ = ["ProteinDomain"]
