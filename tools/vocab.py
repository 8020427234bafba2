"""Tokenizers for Chinese (medical) text: train a domain tokenizer, extend a base model's vocabulary
with its pieces, and measure what that buys.

    python tools/vocab.py train CONFIG.yaml --vocab_size N --out DIR [--model_type bpe|unigram]
                                [--character_coverage C] [--user_defined_symbols FILE|a,b,c] [--overwrite]
    python tools/vocab.py extend --base DIR --add DIR_OR_FILE --out DIR [--config CONFIG.yaml] [--overwrite]
        (--add: a SentencePiece tokenizer, or a text file of pieces or domain terms, one per line)
    python tools/vocab.py report CONFIG.yaml --tokenizer DIR_OR_HUB_ID [--tokenizer DIR_OR_HUB_ID ...]

Why a separate tool: these are one-off preparation steps run before training (like `hf download`),
with their own inputs and outputs; pretrain.py only needs their result, a tokenizer directory, and
resizes and initialises the model's embeddings for it (pretrain.build_model).

Extending keeps every base token's id and text, appends the new ones, and leaves the tokenization of
text containing none of the new pieces (their characters included) unchanged, for both tokenizer families
(byte-level: where its characters are whole base tokens; one the base spells in bytes may use the new
part-of-a-character tokens that spell another character with the same leading bytes):
  * SentencePiece-model tokenizers (Llama-2 style, tokenizer.model): new pieces are appended to the
    model proto (as Chinese-LLaMA does, but scored below every base piece, in their own order, so the
    base merges keep their priority; in a BPE model each with the characters and intermediate pieces a
    merge path to it needs, so a term from a text file is produced too; user-defined symbols stay
    USER_DEFINED, whole wherever they occur) and to the fast tokenizer's tokenizer.json (user-defined
    symbols as non-special added tokens);
  * byte-level BPE tokenizer.json tokenizers (Qwen2 / Llama-3 style): each new piece is written in the
    byte alphabet, built from the tokens the current vocabulary splits it into by merges appended
    after all existing merges, and its intermediate tokens join the vocabulary (a user-defined symbol
    the pre-tokenizer would split, such as 2型糖尿病, becomes a non-special added token instead; any other
    such piece is not added).
With a glossary (a text file of terms), the result counts and names the terms the extended tokenizer still
does not give as one token (terms_not_whole), and the tool warns.
Special tokens numbered after the vocabulary (Qwen2, Llama-3, a Llama-2 <pad>) keep their ids too, and
check_extension compares ids with the tokenizer's own BOS/EOS on sample texts before anything is written.
The output directory of `train` and `extend` is built in a temporary sibling and renamed into place; it is
never an input or a directory holding one, and an existing non-empty one is replaced only if an earlier
`train` or `extend` wrote it (vocab_train.json or vocab_extension.json lists its files), nothing else is in
it, and --overwrite is given. Tokenizers given by hub id (`report --tokenizer`) load as in pretrain.py: where
the hub is unreachable, from the local cache only, failing within seconds with the fixes; `extend --base`
must be a local directory.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import data_utils  # noqa: E402
from data_utils import DataError  # noqa: E402

BYTE_TO_CHAR = data_utils.byte_level_alphabet()


# --------------------------------------------------------------------------------------------
# What to add
# --------------------------------------------------------------------------------------------
def read_terms(path: Path, option: str) -> list[str]:
    """The terms of a text file, one per line, in order, without repeats: UTF-8 with or without a BOM, GB18030
    or UTF-16; a space inside a term is SentencePiece's ▁."""
    encoding = data_utils.detect_encoding(path, "auto")
    try:
        text = path.read_bytes().decode(encoding).removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        line = path.read_bytes()[:e.start].count(b"\n") + 1
        raise DataError(f"{option} `{path}` line {line} is not valid {encoding} (detected from the first MB): "
                        "re-save the file as UTF-8.") from None
    return list(dict.fromkeys(line.strip().replace(" ", "▁") for line in text.splitlines() if line.strip()))


def pieces_to_add(add: Path) -> tuple[list[str], set[str], list[str]]:
    """New pieces, in order, which of them are user-defined symbols, and the terms of a glossary: the normal and
    user-defined pieces of a SentencePiece model (a directory holding tokenizer.model, or the .model file; no
    terms), or a text file with one piece or term per line (UTF-8 with or without a BOM, GB18030 or UTF-16;
    none user-defined). A space in a term is SentencePiece's ▁, and a term that starts with a Latin letter or
    digit also comes as ▁term, the form it has after a space or at the start of a text (COVID-19 in "has
    COVID-19"). User-defined symbols (`train --user_defined_symbols`) are whole tokens wherever they occur rather
    than the result of merges, so they need no pieces to merge from."""
    model = add / "tokenizer.model" if add.is_dir() else add
    if model.suffix == ".model" and model.is_file():
        from sentencepiece import sentencepiece_model_pb2 as sp_pb2

        Piece = sp_pb2.ModelProto.SentencePiece
        proto = sp_pb2.ModelProto()
        proto.ParseFromString(model.read_bytes())
        return ([p.piece for p in proto.pieces if p.type in (Piece.NORMAL, Piece.USER_DEFINED)],
                {p.piece for p in proto.pieces if p.type == Piece.USER_DEFINED}, [])
    if add.is_file():
        terms = read_terms(add, "--add")
        word_initial = [f"▁{t}" for t in terms if t[0].isascii() and t[0].isalnum()]
        return list(dict.fromkeys(terms + word_initial)), set(), terms
    raise DataError(f"--add `{add}` is neither a SentencePiece tokenizer (a directory with tokenizer.model, or a "
                    ".model file) nor a text file of pieces. Train one with `python tools/vocab.py train`.")


def term_is_whole(tokenizer, term: str) -> bool:
    """Whether the tokenizer gives the term, alone, as one token (next to at most a token of whitespace, such
    as SentencePiece's ▁ before it)."""
    text = term.replace("▁", " ").strip()
    pieces = [tokenizer.decode([i]).strip() for i in tokenizer(text, add_special_tokens=False)["input_ids"]]
    return text in pieces and all(piece in ("", text) for piece in pieces)


# --------------------------------------------------------------------------------------------
# Extending
# --------------------------------------------------------------------------------------------
def _copy_base(base: Path, tmp: Path, skip: tuple[str, ...]) -> None:
    for f in base.iterdir():
        if f.is_file() and f.name not in skip and not f.name.endswith((".safetensors", ".bin", ".pt")):
            shutil.copy(f, tmp / f.name)


def _merge_pairs(merges: list) -> list[tuple[str, str]]:
    return [tuple(m) if isinstance(m, list) else tuple(m.split(" ", 1)) for m in merges]


def _keep_added_token_ids(vocab: dict[str, int], added: list[tuple[int, str]], what: str) -> None:
    """Give the model vocabulary the added tokens it lacks, under their own ids. The tokenizers library numbers
    an added token that is not in the model's vocabulary from the vocabulary's size (and transformers' Qwen2 and
    Llama tokenizers re-add their special tokens that way on every load), so pieces appended after special
    tokens that sit after the vocabulary (Qwen2, Llama-3, a Llama-2 <pad> at 32000) would push them along."""
    owners = {i: t for t, i in vocab.items()}
    for token_id, content in added:
        if content in vocab:
            continue
        if token_id in owners:
            raise DataError(f"{what}: added token `{content}` has id {token_id}, which the model vocabulary gives to "
                            f"`{owners[token_id]}`; the base tokenizer is inconsistent, fix or re-save it first.")
        vocab[content] = owners[token_id] = token_id


def _added_token(token_id: int, content: str) -> dict:
    """A user-defined symbol in tokenizer.json: matched whole in the raw text, before the normalizer and the
    pre-tokenizer, and decoded as its text (not special: skip_special_tokens keeps it)."""
    return {"id": token_id, "content": content, "single_word": False, "lstrip": False, "rstrip": False,
            "normalized": False, "special": False}


def _sentencepiece_bpe(text: str, scores: dict[str, float]) -> list[str]:
    """A SentencePiece BPE model's split of `text`: from characters, repeatedly join the adjacent pair whose
    concatenation is the highest-scored piece (the leftmost on a tie)."""
    word = list(text)
    while len(word) > 1:
        joins = [(scores[word[j] + word[j + 1]], -j) for j in range(len(word) - 1) if word[j] + word[j + 1] in scores]
        if not joins:
            break
        j = -max(joins)[1]
        word[j:j + 2] = [word[j] + word[j + 1]]
    return word


def merge_path(piece: str, scores: dict[str, float]) -> list[str]:
    """What a SentencePiece BPE vocabulary (`scores`) must gain, in order, for merges to produce `piece`: its
    characters that are not pieces (a merge joins pieces; tokenizer.json's merges need both halves in the
    vocabulary), then the piece built left to right from the tokens the vocabulary splits it into (高血压 from
    ['高', '血', '压']: 高血, then 高血压). A piece appended alone, whose halves are not pieces, is never produced."""
    chars = [c for c in dict.fromkeys(piece) if c not in scores]
    tokens = _sentencepiece_bpe(piece, scores)
    built = [tokens[0] + "".join(tokens[1:k + 1]) for k in range(1, len(tokens))]
    return chars + [b for b in built if b not in scores]


def extend_sentencepiece(base: Path, base_tok, pieces: list[str], tmp: Path,
                         user_defined: set[str] = frozenset()) -> int:
    """Append the pieces to tokenizer.model and, when the base has one, to tokenizer.json's BPE model: the
    tokenizer.json keeps its normalizer, pre-tokenizer and post-processor (the BOS a Llama-2 tokenizer saved by
    transformers adds lives only there), its vocabulary and merges; the new merges come after all of them.
    In a BPE model each piece comes with the pieces of its merge_path (a domain term from a text file, a
    unigram model's piece). User-defined symbols stay USER_DEFINED in the proto and become non-special added
    tokens in tokenizer.json (as transformers converts them), whole wherever they occur. Returns the number of
    tokens added."""
    from sentencepiece import sentencepiece_model_pb2 as sp_pb2

    Piece = sp_pb2.ModelProto.SentencePiece
    proto = sp_pb2.ModelProto()
    proto.ParseFromString((base / "tokenizer.model").read_bytes())
    size = len(proto.pieces)
    # base tokens past the proto (e.g. a <pad> added at 32000) join it, so the new pieces do not take their ids
    extra = sorted((i, t) for t, i in base_tok.get_vocab().items() if i >= size)
    if [i for i, _ in extra] != list(range(size, size + len(extra))):
        raise DataError(f"--base `{base}`: its tokens past tokenizer.model's {size} pieces have ids "
                        f"{[i for i, _ in extra][:5]}..., not {size}, {size + 1}, ...: new pieces have no free ids to "
                        "follow them. Re-save the base tokenizer with contiguous ids.")
    decoder = base_tok.added_tokens_decoder
    for i, token in extra:
        special = i in decoder and decoder[i].special
        proto.pieces.append(Piece(piece=token, score=0.0, type=Piece.CONTROL if special else Piece.USER_DEFINED))
    first_new = len(proto.pieces)
    existing = {p.piece for p in proto.pieces}
    scores = {p.piece: p.score for p in proto.pieces if p.type == Piece.NORMAL}
    lowest = min(scores.values(), default=0.0)
    bpe = proto.trainer_spec.model_type == sp_pb2.TrainerSpec.BPE
    for piece in pieces:
        if piece in existing:
            continue
        if piece in user_defined:  # matched whole before any merge, as the trained model has it
            proto.pieces.append(Piece(piece=piece, score=0.0, type=Piece.USER_DEFINED))
            existing.add(piece)
            continue
        for part in merge_path(piece, scores) if bpe else [piece]:
            if part in existing:  # a character that is a user-defined or control piece
                continue
            # scored below every base piece: base merges always win, in their order
            scores[part] = lowest - (len(proto.pieces) - first_new + 1)
            proto.pieces.append(Piece(piece=part, score=scores[part]))
            existing.add(part)
    _copy_base(base, tmp, skip=("tokenizer.json", "tokenizer.model"))
    (tmp / "tokenizer.model").write_bytes(proto.SerializeToString())
    if (base / "tokenizer.json").is_file():
        spec = json.loads((base / "tokenizer.json").read_text(encoding="utf-8"))
        model = spec["model"]
        if model.get("type") != "BPE":
            raise DataError(f"--base `{base}`: its tokenizer.json holds a {model.get('type')} model; extending keeps "
                            "tokenizer.json only for the BPE models transformers writes for SentencePiece tokenizers.")
        vocab = model["vocab"]
        _keep_added_token_ids(vocab, [(i, p.piece) for i, p in enumerate(proto.pieces[:first_new]) if i >= size],
                              f"--base `{base}`")
        for i, p in enumerate(proto.pieces[first_new:], first_new):
            vocab[p.piece] = i
        # merges as transformers derives them from the proto (every split into two vocabulary pieces, in the id
        # order of the result), for each merge that involves a new piece
        merges = _merge_pairs(model["merges"])
        known = set(merges)
        for piece, i in sorted(vocab.items(), key=lambda item: item[1]):
            splits = [(piece[:k], piece[k:]) for k in range(1, len(piece)) if piece[:k] in vocab and piece[k:] in vocab]
            for pair in sorted(splits, key=lambda pair: (vocab[pair[0]], vocab[pair[1]])):
                if pair not in known and max(i, vocab[pair[0]], vocab[pair[1]]) >= first_new:
                    merges.append(pair)
                    known.add(pair)
        model["merges"] = [list(m) for m in merges]
        spec.setdefault("added_tokens", []).extend(_added_token(i, p.piece) for i, p in
                                                   enumerate(proto.pieces[first_new:], first_new)
                                                   if p.type == Piece.USER_DEFINED)
        (tmp / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
    return len(proto.pieces) - first_new


def _bpe(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Byte-pair merges by rank, as the BPE model applies them to one pre-token."""
    word = list(symbols)
    while len(word) > 1:
        rank, i = min((ranks.get((word[j], word[j + 1]), 1 << 62), j) for j in range(len(word) - 1))
        if rank == 1 << 62:
            break
        first, second = word[i], word[i + 1]
        merged, j = [], 0
        while j < len(word):
            if j < len(word) - 1 and word[j] == first and word[j + 1] == second:
                merged.append(first + second)
                j += 2
            else:
                merged.append(word[j])
                j += 1
        word = merged
    return word


def extend_byte_level_bpe(base: Path, base_tok, pieces: list[str], tmp: Path,
                          user_defined: set[str] = frozenset()) -> int:
    """Add each piece by merges, or, for a user-defined symbol the pre-tokenizer would split (2型糖尿病, COVID-19:
    digits and punctuation are pre-tokens of their own), as a non-special added token, so it stays whole too.
    Returns the number of tokens added."""
    from tokenizers import Tokenizer

    spec = json.loads((base / "tokenizer.json").read_text(encoding="utf-8"))
    model = spec["model"]
    pre_tokenizer = Tokenizer.from_str(json.dumps(spec)).pre_tokenizer
    vocab = model["vocab"]
    _keep_added_token_ids(vocab, [(t["id"], t["content"]) for t in spec.get("added_tokens", [])], f"--base `{base}`")
    merges = _merge_pairs(model["merges"])
    ranks = {pair: i for i, pair in enumerate(merges)}
    next_id = max(vocab.values()) + 1
    added = 0
    for piece in sorted(dict.fromkeys(pieces), key=len):  # short pieces first: longer ones build on them
        text = piece.replace("▁", " ")
        if not text:
            continue
        if pre_tokenizer is not None and len(pre_tokenizer.pre_tokenize_str(text)) != 1:
            if piece in user_defined and text not in vocab:  # matched in the raw text before pre-tokenization
                vocab[text] = next_id
                spec.setdefault("added_tokens", []).append(_added_token(next_id, text))
                next_id += 1
                added += 1
            continue  # the pre-tokenizer would split it: no merge could ever produce it
        target = "".join(BYTE_TO_CHAR[b] for b in text.encode("utf-8"))
        if target in vocab:
            continue
        tokens = _bpe([BYTE_TO_CHAR[b] for b in text.encode("utf-8")], ranks)
        chain = []  # one merge per step, appended after every existing merge
        while len(tokens) > 1:
            chain.append((tokens[0], tokens[1]))
            tokens = [tokens[0] + tokens[1]] + tokens[2:]
        if any(a + b in vocab for a, b in chain):
            continue  # a new merge onto a base token that no base merge reaches would re-encode base text holding it
        for pair in chain:
            merges.append(pair)
            ranks[pair] = len(merges) - 1
            vocab[pair[0] + pair[1]] = next_id
            next_id += 1
            added += 1
    model["merges"] = [list(m) for m in merges]
    _copy_base(base, tmp, skip=("tokenizer.json",))
    (tmp / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
    return added


MARKER = "vocab_extension.json"  # written into every extension: what it is made of and which files the tool wrote
TRAINED = "vocab_train.json"  # the same, written into every `train` output
REPORT = "compression_report.json"  # written next to it by `extend --config`


def check_output_dir(out: Path, inputs: list[Path], overwrite: bool) -> None:
    """`train` and `extend` replace --out as a whole, so they refuse an --out whose loss could hurt: an input (or a
    directory holding one, such as the base model's), and a non-empty directory unless an earlier `train` or `extend`
    wrote it (its vocab_train.json or vocab_extension.json lists the files), nothing else is in it, and --overwrite
    is given."""
    target = out.resolve()
    for path in inputs:
        if target == path.resolve() or target in path.resolve().parents:
            raise DataError(f"--out `{out}` is or holds the input `{path}`, which writing there would delete: choose "
                            f"a new directory, e.g. `{out.with_name(out.name + '_new')}`.")
    if not out.exists():
        return
    if not out.is_dir():
        raise DataError(f"--out `{out}` is a file: choose a directory path.")
    present = {f.name for f in out.iterdir()}
    if not present:
        return
    record = {}
    for marker in (MARKER, TRAINED):
        try:
            record = json.loads((out / marker).read_text(encoding="utf-8"))
            break
        except (OSError, ValueError):
            continue
    files = record.get("files") if isinstance(record, dict) else None
    if not isinstance(files, list):
        raise DataError(f"--out `{out}` is a non-empty directory that tools/vocab.py did not write (no readable "
                        f"{TRAINED} or {MARKER}): choose a new or empty directory.")
    if not overwrite:
        raise DataError(f"--out `{out}` holds the output of an earlier `{record.get('written_by', 'tools/vocab.py')}`: "
                        "add --overwrite to replace it, or choose another directory.")
    foreign = sorted(present - {*map(str, files), MARKER, TRAINED, REPORT})
    if foreign:
        raise DataError(f"--out `{out}` holds files that tools/vocab.py did not write ({', '.join(foreign[:5])}): "
                        "--overwrite would delete them. Move them out or choose another directory.")


@contextlib.contextmanager
def staging(out: Path):
    """A temporary sibling of `out` to build the new directory in (the same filesystem, so renaming it into place is
    atomic), removed afterwards whatever happens."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _replace_dir(staged: Path, out: Path, trash: Path) -> None:
    """Rename `staged` to `out`; an `out` already there is moved to `trash` first (same filesystem) and put back
    if the rename fails, so `out` is always either the old directory or the complete new one."""
    if out.exists():
        os.replace(out, trash)
    try:
        os.replace(staged, out)
    except OSError:
        if trash.exists():
            os.replace(trash, out)
        raise


def save_trained_tokenizer(cached: Path, out: Path, overwrite: bool, settings: dict) -> None:
    """Copy the trained tokenizer from the cache to `out` whole, as `extend` writes: never merged into a directory
    holding other files (a copy over them would mix two tokenizers), and replaced only with --overwrite."""
    check_output_dir(out, [cached], overwrite)
    with staging(out) as tmp:
        staged = tmp / "saved"
        shutil.copytree(cached, staged)
        files = sorted(f.name for f in staged.iterdir())
        (staged / TRAINED).write_text(json.dumps({"written_by": "tools/vocab.py train", **settings, "files": files},
                                                 indent=1, ensure_ascii=False))
        _replace_dir(staged, out, tmp / "replaced")


def hub_download_hint(name: str) -> str:
    return (f"download it first where there is network: `hf download {name} --local-dir models/{name.split('/')[-1]}` "
            "(or through a mirror: HF_ENDPOINT=https://hf-mirror.com), and pass that directory")


def local_model_dir(name: str, flag: str) -> str:
    """A `modelscope:` id as its downloaded directory (the whole model: the run reads it next); else `name`."""
    return data_utils.fetch_modelscope_model(name, None, flag, flag, DataError) if data_utils.is_modelscope(name) \
        else name


def load_tokenizer(name: str, flag: str):
    """AutoTokenizer for a tokenizer directory, a hub id or a modelscope: id, as pretrain.py loads one
    (data_utils.hub_access): a hub id that is neither reachable nor cached fails within seconds with the fixes, not
    after the hub client's retries (most of a minute) with an OSError traceback."""
    from transformers import AutoTokenizer

    name = local_model_dir(name, flag)
    with data_utils.hub_access(name, flag, flag):
        try:
            return AutoTokenizer.from_pretrained(os.path.expanduser(name))
        except ValueError as e:  # a directory without tokenizer files, and no slow tokenizer to convert
            raise DataError(f"{flag} `{name}`: no tokenizer loads from it ({str(e).splitlines()[0]}). Point it at a "
                            "directory holding tokenizer.json or tokenizer.model.") from None


def extend_tokenizer(base: Path, add: Path, out: Path, overwrite: bool = False) -> dict:
    """Extend the tokenizer in `base` with the pieces of `add`; write a tokenizer directory to `out`, built in a
    temporary sibling and renamed into place only after check_extension passed."""
    from transformers import AutoTokenizer

    if not base.is_dir():
        raise DataError(f"--base `{base}` is not a directory: extending reads and rewrites a tokenizer's files, so "
                        f"they must be on disk. For a hub model, {hub_download_hint(str(base))}.")
    check_output_dir(out, [base, add], overwrite)
    if (base / "tokenizer.model").is_file():
        family, extend = "sentencepiece", extend_sentencepiece
    elif (base / "tokenizer.json").is_file() and "ByteLevel" in (base / "tokenizer.json").read_text("utf-8"):
        family, extend = "byte-level BPE", extend_byte_level_bpe
    else:
        raise DataError(f"--base `{base}` holds neither tokenizer.model (SentencePiece) nor a byte-level BPE "
                        "tokenizer.json: these are the two families that can be extended.")
    pieces, user_defined, terms = pieces_to_add(add)
    base_tok = load_tokenizer(str(base), "--base")
    with staging(out) as tmp:
        (tmp / "work").mkdir()
        added = extend(base, base_tok, pieces, tmp / "work", user_defined)
        staged = tmp / "saved"
        AutoTokenizer.from_pretrained(tmp / "work").save_pretrained(staged)
        if family == "sentencepiece":
            shutil.copy(tmp / "work" / "tokenizer.model", staged / "tokenizer.model")  # kept for a later extension
        extended = AutoTokenizer.from_pretrained(staged)
        check_extension(base_tok, extended)
        result = {"family": family, "base_tokens": len(base_tok), "pieces_offered": len(pieces),
                  "added_tokens": added, "tokens": len(extended)}
        if terms:  # a glossary: say which terms the extension still does not give as one token
            not_whole = [t for t in terms if not term_is_whole(extended, t)]
            result.update(terms=len(terms), terms_not_whole=len(not_whole), terms_not_whole_examples=not_whole[:10])
        files = sorted(f.name for f in staged.iterdir())
        (staged / MARKER).write_text(json.dumps({"written_by": "tools/vocab.py extend", "base": str(base),
                                                 "add": str(add), **result, "files": files}, indent=1))
        _replace_dir(staged, out, tmp / "replaced")
    return result


SAMPLE_TEXTS = ["", "The patient was admitted with a fever of 38.5 degrees.", "1234567890 + 42 = ?",
                "  two  spaces,\ttabs\nand new lines\n\n", "def f(x):\n    return x ** 2  # code",
                "Ünïcödé, emoji 😀 and Chinese: 高血压是一种常见病。"]


def check_extension(base, extended, texts: list[str] = SAMPLE_TEXTS) -> None:
    """Base ids keep their tokens, new ids come after every base id, and sample texts (and the special tokens)
    encode as before with the tokenizer's own BOS/EOS: the same ids where no new piece applies, the same text
    back where one does."""
    base_vocab = base.get_vocab()
    ext_vocab = extended.get_vocab()
    moved = [t for t, i in base_vocab.items() if ext_vocab.get(t) != i]
    if moved:
        raise DataError(f"extension moved {len(moved)} base tokens (e.g. {moved[:3]}): refusing to write it.")
    top = max(base_vocab.values())
    if min((i for t, i in ext_vocab.items() if t not in base_vocab), default=top + 1) <= top:
        raise DataError("extension gave a new token an id inside the base range: refusing to write it.")
    specials = " ".join(base.all_special_tokens)
    for text in [*texts, f"{specials} between {specials}"]:
        before, after = base(text)["input_ids"], extended(text)["input_ids"]
        if all(i <= top for i in after) and after != before:
            raise DataError(f"extension changed how {text!r} tokenizes (ids {before[:6]}... became {after[:6]}..., "
                            "special tokens included): refusing to write it.")
        if base.unk_token_id not in before and extended.decode(after) != base.decode(before):
            raise DataError(f"extension changed what {text!r} decodes to: refusing to write it.")


# --------------------------------------------------------------------------------------------
# Report: characters per token and byte-fallback share, per source
# --------------------------------------------------------------------------------------------
def compression(tokenizer, texts: list[str]) -> dict:
    is_byte = data_utils.byte_token_mask(tokenizer)
    ids = [i for enc in tokenizer(texts, add_special_tokens=False)["input_ids"] for i in enc]
    chars = sum(map(len, texts))
    return {"characters": chars, "tokens": len(ids), "chars_per_token": round(chars / max(len(ids), 1), 3),
            "tokens_per_char": round(len(ids) / max(chars, 1), 3),
            "byte_token_share": round(float(is_byte[np.asarray(ids, dtype=np.int64)].mean()) if ids else 0.0, 4)}


def report(sources, tokenizer_dirs: list[str], max_chars: int = 5_000_000) -> dict:
    tokenizers = {d: load_tokenizer(d, "--tokenizer") for d in tokenizer_dirs}
    table = {}
    for spec in data_utils.parse_sources(sources):
        texts, total = [], 0
        for text in data_utils.iter_texts(spec):
            texts.append(text)
            total += len(text)
            if total >= max_chars:
                break
        table[spec.name] = {d: compression(tok, texts) for d, tok in tokenizers.items()}
    return table


def print_report(table: dict) -> None:
    for source, rows in table.items():
        print(f"source `{source}`")
        first = next(iter(rows.values()))
        for name, r in rows.items():
            gain = first["tokens_per_char"] / max(r["tokens_per_char"], 1e-9)
            print(f"  {name}: {r['characters']:,} chars, {r['tokens']:,} tokens, {r['chars_per_token']} chars/token, "
                  f"byte tokens {r['byte_token_share']:.1%}, {gain:.2f}x fewer tokens than the first")


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------
def load_sources(config: str, overrides: list[str]):
    import pretrain

    model_args, data_args, training_args = pretrain.parse_args([config, *overrides])
    pretrain.fetch_from_modelscope(model_args, data_args, training_args, with_models=False)
    return data_args


def check_out_is_no_source(out: str, data_args) -> None:
    """A tokenizer written where the config's sources read (its folder, `per_file` data/) would be trained on by
    the next run: tokenizer.json and the other .json files are data files there."""
    if problem := data_utils.convert_target_problem(data_args.sources, data_utils.parse_sources(data_args.sources),
                                                    Path(out), "the tokenizer's .json files"):
        raise DataError(f"{problem} (tokenizers/ is the usual place)")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="tools/vocab.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train a SentencePiece tokenizer on a config's sources")
    train.add_argument("config")
    train.add_argument("--vocab_size", type=int, required=True)
    train.add_argument("--out", required=True)
    train.add_argument("--model_type", default="bpe", choices=["bpe", "unigram"])
    train.add_argument("--character_coverage", type=float, default=0.9995)
    train.add_argument("--user_defined_symbols", default="",
                       help="pieces that must be whole tokens (e.g. medical terms): a file, one per line, or a,b,c")
    train.add_argument("--overwrite", action="store_true",
                       help="replace an --out that an earlier `train` wrote (never a directory with other files)")
    extend = sub.add_parser("extend", help="extend a base tokenizer with the pieces of another")
    extend.add_argument("--base", required=True)
    extend.add_argument("--add", required=True)
    extend.add_argument("--out", required=True)
    extend.add_argument("--config", help="also report compression before and after on this config's sources")
    extend.add_argument("--overwrite", action="store_true",
                        help="replace an --out that an earlier `extend` wrote (never a directory with other files)")
    rep = sub.add_parser("report", help="characters per token and byte-token share per source")
    rep.add_argument("config")
    rep.add_argument("--tokenizer", action="append", required=True)
    args, overrides = parser.parse_known_args(argv)
    if args.command == "train" and args.vocab_size < 300:  # 256 byte pieces and the special tokens come first
        parser.error(f"--vocab_size {args.vocab_size}: a SentencePiece tokenizer with byte fallback needs at least 300 "
                     "pieces (256 bytes and the special tokens come first); Chinese text wants 8,000 or more")
    import pretrain

    try:
        if args.command == "train":
            symbols = args.user_defined_symbols
            symbols = (read_terms(Path(symbols), "--user_defined_symbols") if symbols and Path(symbols).is_file()
                       else [s for s in symbols.split(",") if s])
            data_args = load_sources(args.config, overrides)
            check_out_is_no_source(args.out, data_args)
            check_output_dir(Path(args.out), [Path(data_args.cache_dir)], args.overwrite)  # before training, not after
            cached = data_utils.train_sentencepiece_tokenizer(
                data_args.sources, data_args.cache_dir, args.vocab_size, args.model_type, args.character_coverage,
                user_defined_symbols=symbols, option_names=("--vocab_size", "--character_coverage"))
            save_trained_tokenizer(cached, Path(args.out), args.overwrite, {
                "config": args.config, "vocab_size": args.vocab_size, "model_type": args.model_type,
                "character_coverage": args.character_coverage, "user_defined_symbols": symbols})
            print(f"wrote a {args.vocab_size}-token SentencePiece {args.model_type} tokenizer to {args.out}")
        elif args.command == "extend":
            args.base = local_model_dir(args.base, "--base")
            data_args = load_sources(args.config, overrides) if args.config else None
            if data_args is not None:
                check_out_is_no_source(args.out, data_args)
            result = extend_tokenizer(Path(args.base), Path(args.add), Path(args.out), args.overwrite)
            print(json.dumps(result, ensure_ascii=False))
            if result.get("terms_not_whole"):
                print(f"warning: {result['terms_not_whole']} of the {result['terms']} terms still do not come out as one "
                      f"token (e.g. {', '.join(result['terms_not_whole_examples'][:3])}): the base's pre-tokenizer "
                      "splits them (digits, punctuation or spaces in a byte-level tokenizer), or a merge of the base "
                      "joins their first characters with what comes before. To keep such terms whole, train a "
                      "tokenizer with them as --user_defined_symbols and extend with it.", file=sys.stderr)
            if args.config:
                table = report(data_args.sources, [args.base, args.out])
                print_report(table)
                (Path(args.out) / "compression_report.json").write_text(json.dumps(table, indent=1))
        else:
            print_report(report(load_sources(args.config, overrides).sources, args.tokenizer))
    except (DataError, pretrain.ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
