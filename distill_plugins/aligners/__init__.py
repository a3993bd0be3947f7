"""Vocabulary aligners: relate a teacher's vocabulary and tokenization to the student's.

* ``identity`` (:mod:`.identity`): one tokenizer; padding may differ.
* ``eta`` (:mod:`.eta`): exact token alignment + the objective over shared tokens.
* ``dskd`` (:mod:`.dskd`): dual-space KD with trainable projectors.
* ``uld`` (:mod:`.uld`): sorted-probability distance (baseline).

The engine-facing surface is :class:`~.base.AlignerBase` with
:class:`~.base.AlignerInputs` / :class:`~.base.AlignerOutput`; the data path is
:mod:`distill_plugins.data.alignment_collate`. docs/aligners.md has the maths
and the recipe keys.
"""

from .base import AlignerBase, AlignerInputs, AlignerOutput, resolve_aligner_name
from .dskd import DSKDAligner, DSKDProjectors, projector_init
from .eta import ETAAligner, Alignment, align_tokens, positional_alignment
from .identity import IdentityAligner, common_padded_vocab_size, pad_vocab_rows, padded_vocab_size
from .uld import ULDAligner, sorted_probability_distance
from .vocab import VocabMap, load_tokenizer

__all__ = [
    "AlignerBase", "AlignerInputs", "AlignerOutput", "Alignment", "DSKDAligner", "DSKDProjectors", "ETAAligner",
    "IdentityAligner", "ULDAligner", "VocabMap", "align_tokens", "common_padded_vocab_size", "load_tokenizer",
    "pad_vocab_rows", "padded_vocab_size", "positional_alignment", "projector_init", "resolve_aligner_name",
    "sorted_probability_distance",
]
