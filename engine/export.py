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
                   help="tokenizer folder to ship (default: the one saved with the run's shards)")
    p.add_argument("--top-k", type=int, default=384, help="BoW entries kept per text in dupmae.json (default 384)")
    p.add_argument("--dense", default="cls", choices=["cls", "mean"],
                   help="dense vector in dupmae.json: the raw final [CLS] (paper) or the mean of the tokens")
    p.add_argument("--max-length", type=int, default=None,
                   help="encoding length in dupmae.json (default: the shards' max_len)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT_DIR")


def run_from_args(args) -> int:
    out = export(args.source, args.out_dir, tag=args.tag, tokenizer=args.tokenizer, top_k=args.top_k,
                 dense=args.dense, max_length=args.max_length, overwrite=args.overwrite,
                 log=lambda m: print(m, file=sys.stderr, flush=True))
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
    marker = json.loads(marker_path.read_text(encoding="utf-8"))
    return ckpt_dir, tag, marker, ckpt_dir.parent


def consolidated_state_dict(ckpt_dir: Path, tag: str) -> dict:
    """fp32 weights of checkpoint `tag`, whatever ZeRO stage and world size saved it."""
    import torch

    folder = ckpt_dir / tag
    if any(folder.glob("*_optim_states.pt")):  # ZeRO 1-3 (and DeepSpeed's bf16 optimizer): fp32 master shards
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        try:
            with contextlib.redirect_stdout(sys.stderr):  # its progress lines; stdout carries only the result
                state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
        except Exception as e:  # a missing or truncated shard: name the folder
            raise ExportError(f"{folder}: cannot consolidate the ZeRO shards: {type(e).__name__}: {e}") from e
    else:  # no ZeRO partitioning: the module file holds the weights
        path = folder / "mp_rank_00_model_states.pt"
        if not path.is_file():
            raise ExportError(f"{folder}: neither ZeRO optimizer shards nor {path.name}")
        try:
            state = torch.load(path, map_location="cpu", weights_only=False)["module"]
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
           top_k: int = 384, dense: str = "cls", max_length: int | None = None, overwrite: bool = False,
           log=lambda m: None) -> Path:
    """Write the Hugging Face folder; returns its path. The folder appears complete or not at all."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    from .config import ConfigError, load_config
    from .model import DupMAE

    if top_k < 1:
        raise ExportError(f"--top-k must be >= 1, got {top_k}")
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ExportError(f"{out} exists and is not empty: choose another folder or pass --overwrite")
    ckpt_dir, tag, marker, run_dir = locate(source, tag)
    config_path = run_dir / "config.toml"
    if not config_path.is_file():
        raise ExportError(f"{config_path}: missing (the run's resolved configuration, written at its start)")
    try:
        cfg = load_config(config_path)
    except ConfigError as e:
        raise ExportError(str(e)) from e

    t0 = time.perf_counter()
    log(f"[export] {ckpt_dir / tag}: step {marker.get('step')}, saved by {marker.get('world_size')} rank(s)")
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
        f"parameters, {sum(p.numel() for p in model.enhanced_decoder.parameters()) / 1e6:.1f}M decoder) "
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
