"""The VLM's tokenizer: the special tokens of the chat and vision format, training a small byte-level
BPE for the toy profile, adding the special tokens to a pretrained LLM tokenizer for the full profile,
and saving/loading in the Hugging Face format.

The trained tokenizer splits every digit into its own piece before byte-level BPE runs, so numbers
(the [0, 999] coordinates of `<box>[733, 79, 793, 156]</box>`, the `[12.4 second]` frame prefixes of
videos) are spelled digit by digit, and every byte is in the initial alphabet, so any text encodes and
`decode(encode(text)) == text`. The special tokens are added as special tokens: atomic (never split
by the pre-tokenizer, never produced by merges) and each a single id.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

PAD = "<|pad|>"
END_OF_TEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
IMAGE_PAD = "<|image_pad|>"
IMAGE_PLACEHOLDER = "<image>"
VIDEO_PLACEHOLDER = "<video>"
BOX_START = "<box>"
BOX_END = "</box>"
POINT_START = "<point>"
POINT_END = "</point>"
THINK_START = "<think>"
THINK_END = "</think>"

SPECIAL_TOKENS: tuple[str, ...] = (
    PAD,
    END_OF_TEXT,
    IM_START,
    IM_END,
    VISION_START,
    VISION_END,
    IMAGE_PAD,
    IMAGE_PLACEHOLDER,
    VIDEO_PLACEHOLDER,
    BOX_START,
    BOX_END,
    POINT_START,
    POINT_END,
    THINK_START,
    THINK_END,
)

# Special tokens that belong to an answer's text (grounding and reasoning answers) and so survive
# decoding; every other special token is structure and is dropped from decoded answers.
ANSWER_SPECIAL_TOKENS: tuple[str, ...] = (BOX_START, BOX_END, POINT_START, POINT_END, THINK_START, THINK_END)

BYTE_ALPHABET_SIZE = 256


def _special_added_tokens() -> list[AddedToken]:
    """SPECIAL_TOKENS as atomic, unnormalised special tokens."""
    return [AddedToken(token, special=True, normalized=False, single_word=False, lstrip=False, rstrip=False)
            for token in SPECIAL_TOKENS]


def _digit_split_byte_level_pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    """Each digit its own piece, then GPT-2 style byte-level splitting of the rest."""
    return pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])


def _bpe_trainer(vocab_size: int, min_frequency: int) -> trainers.BpeTrainer:
    return trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        show_progress=False,
        special_tokens=_special_added_tokens(),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )


def _wrap_fast(backend: Tokenizer) -> PreTrainedTokenizerFast:
    """The `tokenizers` object as a Hugging Face tokenizer with our pad/eos, no bos/unk, and the rest
    of SPECIAL_TOKENS registered as extra special tokens (so `all_special_ids` names them all)."""
    extra = [token for token in SPECIAL_TOKENS if token not in (PAD, IM_END)]
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD,
        eos_token=IM_END,
        bos_token=None,
        unk_token=None,
        clean_up_tokenization_spaces=False,
        model_max_length=1 << 30,
        **{_extra_special_tokens_key(): extra},
    )


def train_tokenizer(texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> PreTrainedTokenizerFast:
    """A byte-level BPE with digit-by-digit numbers and SPECIAL_TOKENS as special tokens, trained on
    `texts` (the special tokens take ids 0..len(SPECIAL_TOKENS)-1, in SPECIAL_TOKENS order)."""
    corpus = [text for text in texts if text]
    if not corpus:
        raise ValueError("train_tokenizer needs at least one non-empty text; got none")
    smallest = len(SPECIAL_TOKENS) + BYTE_ALPHABET_SIZE
    if vocab_size < smallest:
        raise ValueError(f"vocab_size must be >= {smallest} (special tokens + 256 bytes), got {vocab_size}")
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = _digit_split_byte_level_pre_tokenizer()
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(corpus, trainer=_bpe_trainer(vocab_size, min_frequency), length=len(corpus))
    return _wrap_fast(backend)


def _extra_special_tokens_key() -> str:
    """The `add_special_tokens` key for extra special tokens: `extra_special_tokens` in transformers
    5, `additional_special_tokens` before."""
    parameters = inspect.signature(PreTrainedTokenizerBase.add_special_tokens).parameters
    return "extra_special_tokens" if "replace_extra_special_tokens" in parameters else "additional_special_tokens"


def _is_atomic_token(tokenizer: PreTrainedTokenizerBase, token: str) -> bool:
    """Whether `token` is an added token of the tokenizer (matched whole, before any splitting)."""
    return token in tokenizer.get_added_vocab()


def missing_special_tokens(tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """The SPECIAL_TOKENS that are not yet atomic added tokens of `tokenizer`, in SPECIAL_TOKENS order."""
    return [token for token in SPECIAL_TOKENS if not _is_atomic_token(tokenizer, token)]


def add_special_tokens(tokenizer: PreTrainedTokenizerBase) -> int:
    """Make every SPECIAL_TOKEN an atomic special token of a pretrained tokenizer (those it already
    has as added tokens are left alone) and set PAD as pad token if it has none. Returns how many ids
    the vocabulary grew by: the caller resizes the model's embeddings by that much."""
    size_before = len(tokenizer)
    missing = missing_special_tokens(tokenizer)
    if missing:
        new_tokens = [AddedToken(token, special=True, normalized=False) for token in missing]
        key = _extra_special_tokens_key()
        if key == "extra_special_tokens":
            tokenizer.add_special_tokens({key: new_tokens}, replace_extra_special_tokens=False)
        else:
            tokenizer.add_special_tokens({key: new_tokens}, replace_additional_special_tokens=False)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = PAD
    return len(tokenizer) - size_before


def save_tokenizer(tokenizer: PreTrainedTokenizerBase, folder: Path) -> None:
    """Write the tokenizer in the Hugging Face format (`AutoTokenizer.from_pretrained(folder)` loads it)."""
    Path(folder).mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(folder))


def single_id_of(tokenizer: PreTrainedTokenizerBase, token: str) -> int | None:
    """The one id `token` encodes to, or None when it does not encode to exactly one known id."""
    ids = tokenizer(token, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        return None
    token_id = tokenizer.convert_tokens_to_ids(token)
    return ids[0] if token_id == ids[0] else None


def load_tokenizer(folder: str | Path) -> PreTrainedTokenizerBase:
    """A tokenizer saved by `save_tokenizer` (or any HF tokenizer folder prepared with
    `add_special_tokens`); ValueError naming the SPECIAL_TOKENS that are not single ids."""
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    missing = [token for token in SPECIAL_TOKENS if single_id_of(tokenizer, token) is None]
    if missing:
        raise ValueError(f"tokenizer at {folder} lacks these special tokens as single ids: {missing}")
    return tokenizer


def _required_id(tokenizer: PreTrainedTokenizerBase, token: str) -> int:
    token_id = single_id_of(tokenizer, token)
    if token_id is None:
        raise ValueError(f"tokenizer lacks the special token {token!r} as a single id")
    return token_id


@dataclass(frozen=True)
class SpecialIds:
    """The ids of the special tokens the encoder, packer and trainer use."""

    pad: int
    im_start: int
    im_end: int
    vision_start: int
    vision_end: int
    image_pad: int
    eos: int

    @classmethod
    def of(cls, tokenizer: PreTrainedTokenizerBase) -> SpecialIds:
        """The ids in `tokenizer`: pad is its pad token (PAD when it has none), eos is IM_END."""
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else _required_id(tokenizer, PAD)
        im_end = _required_id(tokenizer, IM_END)
        return cls(
            pad=pad,
            im_start=_required_id(tokenizer, IM_START),
            im_end=im_end,
            vision_start=_required_id(tokenizer, VISION_START),
            vision_end=_required_id(tokenizer, VISION_END),
            image_pad=_required_id(tokenizer, IMAGE_PAD),
            eos=im_end,
        )
