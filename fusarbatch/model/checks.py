"""Pre-checks of model directories (DESIGN 3.4): everything that can be checked before any weight is loaded.

:func:`check_model_dir` (a Qwen2.5-VL directory), :func:`check_adapter_dir` (a FUSAR-GPT checkpoint) and
:func:`resolve_model_dirs` (what ``--model`` / ``--base-model`` name) read configuration files and
safetensors headers only (and the TLM's own small tensors), so that a run refuses a broken or hostile model
in milliseconds, before any scene is tiled. Every file is read as a regular file (a FIFO or device is
refused before it is opened) with a size cap. ``config.json`` must describe the weights it sits beside:
a configuration that claims more layers or larger sizes than the weight headers hold would make the loader
allocate them (e.g. 1e6 layers) and is refused here. Loading itself is
:meth:`fusarbatch.model.fusar_gpt.FusarGPT.from_pretrained`.
"""

from __future__ import annotations

import json
import os
import re
import stat
import zipfile
from pathlib import Path
from typing import Any

from fusarbatch.errors import ModelError
from fusarbatch.files import file_kind, read_capped

TLM_WEIGHTS_FILE = "tlm.safetensors"
"""fusarbatch's TLM weights: the ``film_mlp`` state dict (keys ``0.weight, 0.bias, 2.weight, 2.bias``)."""
TLM_LEGACY_FILE = "vec64_film.pt"
"""The official release's TLM weights: ``torch.save({"film_mlp": state_dict})``."""
TLM_CONFIG_FILE = "tlm_config.json"
"""TLM settings (``format``, ``sigma``, ``hidden_mult``, ``image_size``, ``vec_dim``)."""

_PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")
_TOKENIZER_FILES = ("tokenizer.json", "vocab.json")


_KNOWN_JSON = (
    "config.json",
    "generation_config.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "preprocessor_config.json",
    "processor_config.json",
    "chat_template.json",
    "model.safetensors.index.json",
    "adapter_config.json",
    TLM_CONFIG_FILE,
    "fusarbatch_train.json",
)
_MAX_JSON_BYTES = 256 * 2**20  # Qwen2.5-VL's tokenizer.json is ~7 MB


def _not_a_dir(d: Path, what: str) -> ModelError:
    state = "is a file, not a directory" if d.exists() else "directory missing"
    return ModelError(f"{what} {d}: {state}; pass a local model directory")


def _regular(d: Path, name: str, what: str) -> os.stat_result:
    """``os.stat`` of ``d/name`` when it is a regular file (links followed).

    :raises ModelError: it is a FIFO, device, socket or directory (never opened: a FIFO would block).
    """
    st = os.stat(d / name)
    if not stat.S_ISREG(st.st_mode):
        raise ModelError(
            f"{what} {d}: {name} is {file_kind(st.st_mode)}, not a regular file; restore the file"
        )
    return st


def _only_files_and_folders(d: Path, what: str) -> None:
    """Every entry of ``d`` is a regular file or a folder: the loaders read whatever they find there
    (``generation_config.json``, ``chat_template.jinja``, ...), and a FIFO would block them.

    :raises ModelError: one line naming the first other entry."""
    for entry in sorted(d.iterdir()):
        try:
            mode = os.stat(entry).st_mode
        except OSError:  # a dangling link: whatever needs the file reports it missing
            continue
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            raise ModelError(
                f"{what} {d}: {entry.name} is {file_kind(mode)}, not a regular file; remove or restore it"
            )


def _not_too_large(d: Path, name: str, what: str) -> None:
    st = _regular(d, name, what)
    if st.st_size > _MAX_JSON_BYTES:
        raise ModelError(f"{what} {d}: {name} is larger than {_MAX_JSON_BYTES >> 20} MiB; restore the file")


def _json_file(d: Path, name: str, what: str) -> Any:
    """The parsed ``d/name``. :raises ModelError: not a regular file, too large, not UTF-8, or not valid
    JSON."""
    path = d / name
    _not_too_large(d, name, what)
    try:
        return json.loads(read_capped(path, f"{what} {d}:", ModelError, _MAX_JSON_BYTES).decode("utf-8-sig"))
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise ModelError(f"{what} {d}: {name} is not valid JSON ({exc}); restore the file") from None


def _json_object(d: Path, name: str, what: str) -> dict[str, Any]:
    data = _json_file(d, name, what)
    if not isinstance(data, dict):
        raise ModelError(f"{what} {d}: {name} is not a JSON object; restore the file")
    return data


def _tensor_shapes(path: Path, what: str) -> dict[str, list[int]]:
    """Tensor name -> shape from a safetensors header (no tensor data is read). The header must describe
    tensors that fill the file exactly, so a truncated or overwritten file fails here.

    :raises ModelError: the file is not a readable safetensors file.
    """
    from safetensors import safe_open

    _regular(path.parent, path.name, what)  # a FIFO would block the reader
    try:
        with safe_open(str(path), framework="pt") as fh:
            return {k: list(fh.get_slice(k).get_shape()) for k in fh.keys()}  # noqa: SIM118 (not a dict)
    except Exception as exc:  # safetensors raises its own SafetensorError, or OSError
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(
            f"{what} {path.parent}: {path.name} is not a readable safetensors file ({first}); "
            "re-download or re-save it"
        ) from None


def _check_known_files(d: Path, what: str) -> None:
    """The configuration files that are there parse (JSON objects), and ``tokenizer.json`` loads."""
    for name in _KNOWN_JSON:
        if (d / name).is_file():
            _json_object(d, name, what)
    if (d / "tokenizer.json").is_file():
        from tokenizers import Tokenizer

        _not_too_large(d, "tokenizer.json", what)
        try:
            tokenizer = Tokenizer.from_file(str(d / "tokenizer.json"))
        except Exception as exc:  # tokenizers raises a plain Exception subclass
            first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            raise ModelError(f"{what} {d}: tokenizer.json is not a tokenizer ({first}); restore it") from None
        if tokenizer.token_to_id("<|image_pad|>") is None:
            raise ModelError(
                f"{what} {d}: tokenizer.json has no <|image_pad|> token: not a Qwen2.5-VL tokenizer; "
                "restore it"
            )


def _hidden_size(config: dict[str, Any]) -> int | None:
    text = config.get("text_config")
    value = text.get("hidden_size") if isinstance(text, dict) else None
    value = value if value is not None else config.get("hidden_size")
    return value if isinstance(value, int) and value > 0 else None


def _check_tlm(d: Path, hidden_size: int | None, what: str) -> None:
    """``tlm_config.json`` (when there) is a valid TLM configuration, and ``tlm.safetensors`` holds exactly
    the ``film_mlp`` of a model with hidden size ``C``: ``0.weight (H, 64)``, ``0.bias (H,)``,
    ``2.weight (2C, H)``, ``2.bias (2C,)`` with ``H = max(128, hidden_mult * C)`` (DESIGN 3.4), all finite
    (the TLM is small: its values are read); ``vec64_film.pt`` is at least a torch.save archive (read with
    ``weights_only`` at load)."""
    from fusarbatch.model.tlm import TLMConfig

    config = TLMConfig()
    if (d / TLM_CONFIG_FILE).is_file():
        try:
            config = TLMConfig.from_json_dict(_json_object(d, TLM_CONFIG_FILE, what))
        except (ValueError, TypeError) as exc:
            raise ModelError(f"{what} {d}: {TLM_CONFIG_FILE} invalid ({exc})") from None
    if (d / TLM_WEIGHTS_FILE).is_file():
        shapes = _tensor_shapes(d / TLM_WEIGHTS_FILE, what)
        if hidden_size is None:  # C unknown: the tensors need only fit each other
            h, c2 = shapes.get("0.weight", [0])[0], shapes.get("2.weight", [0])[0]
        else:
            h, c2 = max(128, config.hidden_mult * hidden_size), 2 * hidden_size
        expected = {"0.weight": [h, 64], "0.bias": [h], "2.weight": [c2, h], "2.bias": [c2]}
        if shapes != expected:
            raise ModelError(
                f"{what} {d}: {TLM_WEIGHTS_FILE} is not the TLM of a model with hidden size {hidden_size} "
                f"and hidden_mult {config.hidden_mult}: tensors {shapes}, expected {expected}"
            )
        from safetensors.torch import load_file

        if not all(bool(t.isfinite().all()) for t in load_file(str(d / TLM_WEIGHTS_FILE)).values()):
            raise ModelError(f"{what} {d}: {TLM_WEIGHTS_FILE} holds NaN or infinite values; restore it")
    elif (d / TLM_LEGACY_FILE).is_file() and not zipfile.is_zipfile(d / TLM_LEGACY_FILE):
        raise ModelError(f"{what} {d}: {TLM_LEGACY_FILE} is not a torch.save file (truncated or corrupt?)")


def _check_config(d: Path, what: str) -> Any:
    """``config.json`` builds a ``Qwen2_5_VLConfig`` (types and layer settings; no weights are read);
    returns it."""
    from transformers import Qwen2_5_VLConfig

    try:
        return Qwen2_5_VLConfig.from_pretrained(d, local_files_only=True)
    except Exception as exc:  # pydantic/strict-dataclass or value errors, whatever transformers raises
        lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
        detail = " ".join(lines[:3])[:300] or type(exc).__name__
        raise ModelError(
            f"{what} {d}: config.json is not a valid Qwen2.5-VL configuration ({detail})"
        ) from None


_TEXT_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_VISION_BLOCK = re.compile(r"(?:^|\.)visual\.blocks\.(\d+)\.")


def _check_counts(d: Path, layers: Any, depth: Any, shapes: dict[str, list[int]], what: str) -> None:
    """The text layers and vision blocks the weights hold are exactly ``0 .. layers - 1`` and
    ``0 .. depth - 1`` (a value that is not an integer is left to the configuration check).

    :raises ModelError: one line naming the count that disagrees."""

    def found(pattern: re.Pattern[str], vision_names: bool) -> set[int]:
        return {
            int(m.group(1))
            for name in shapes
            if ("visual." in name) == vision_names and (m := pattern.search(name))
        }

    for label, key, want, got in (
        ("text layers", "num_hidden_layers", layers, found(_TEXT_LAYER, False)),
        ("vision blocks", "vision_config.depth", depth, found(_VISION_BLOCK, True)),
    ):
        if isinstance(want, int) and not isinstance(want, bool) and got != set(range(want)):
            held = f"{len(got)} ({min(got)}..{max(got)})" if got else "none"
            raise ModelError(
                f"{what} {d}: config.json gives {key} = {want} but the weights hold {label} {held}; "
                "config.json does not describe these weights: restore it"
            )


def _check_sizes(d: Path, config: Any, shapes: dict[str, list[int]], what: str) -> None:
    """``config.json``'s layer counts and sizes against the weight headers: the text layers and vision
    blocks the weights hold must be exactly ``0 .. num_hidden_layers - 1`` and ``0 .. depth - 1``, and the
    token embeddings, the first text layer's attention and MLP projections, the first vision block, the
    patch embedding and the merger must have the shapes the configuration gives them
    (transformers' Qwen2.5-VL modules: ``q_proj (heads * head_dim, hidden)``, ``k_proj``/``v_proj
    (kv_heads * head_dim, hidden)``, ``gate_proj (intermediate, hidden)``, ``qkv (3 * hidden, hidden)``,
    merger ``mlp.2 (out_hidden, hidden * merge^2)``; ``head_dim = hidden / heads`` unless given). Tensors
    a checkpoint names otherwise are not compared.

    :raises ModelError: one line naming the first disagreement.
    """
    text, vision = config.text_config, config.vision_config
    _check_counts(d, text.num_hidden_layers, vision.depth, shapes, what)
    heads, hidden = int(text.num_attention_heads), int(text.hidden_size)
    head_dim = int(getattr(text, "head_dim", None) or hidden // heads)
    kv = int(text.num_key_value_heads) * head_dim
    inter, v_hidden, v_inter = (
        int(text.intermediate_size),
        int(vision.hidden_size),
        int(vision.intermediate_size),
    )
    merge = int(vision.spatial_merge_size)
    patch = [
        v_hidden,
        int(vision.in_channels),
        int(vision.temporal_patch_size),
        *[int(vision.patch_size)] * 2,
    ]
    expected = {
        "embed_tokens.weight": [int(text.vocab_size), hidden],
        "layers.0.self_attn.q_proj.weight": [heads * head_dim, hidden],
        "layers.0.self_attn.k_proj.weight": [kv, hidden],
        "layers.0.self_attn.v_proj.weight": [kv, hidden],
        "layers.0.self_attn.o_proj.weight": [hidden, heads * head_dim],
        "layers.0.mlp.gate_proj.weight": [inter, hidden],
        "layers.0.mlp.down_proj.weight": [hidden, inter],
        "visual.blocks.0.attn.qkv.weight": [3 * v_hidden, v_hidden],
        "visual.blocks.0.mlp.gate_proj.weight": [v_inter, v_hidden],
        "visual.blocks.0.mlp.down_proj.weight": [v_hidden, v_inter],
        "visual.patch_embed.proj.weight": patch,
        "visual.merger.mlp.2.weight": [int(vision.out_hidden_size), v_hidden * merge * merge],
    }
    for suffix, shape in expected.items():
        vision_tensor = suffix.startswith("visual.")
        name = next(
            (
                n
                for n in shapes
                if (n == suffix or n.endswith("." + suffix)) and ("visual." in n) == vision_tensor
            ),
            None,
        )
        if name is not None and shapes[name] != shape:
            raise ModelError(
                f"{what} {d}: config.json gives {name} the shape {shape} but the weights hold "
                f"{shapes[name]}; config.json does not describe these weights: restore it"
            )


def check_model_dir(model_dir: str | Path) -> Path:
    """Check that ``model_dir`` holds a loadable Qwen2.5-VL model; return it as a Path.

    Required: ``config.json`` (``model_type`` ``qwen2_5_vl``), safetensors weights (``model.safetensors``, or
    ``model.safetensors.index.json`` and every shard it lists) holding a vision tower and token embeddings,
    a tokenizer (``tokenizer.json`` or ``vocab.json``) and an image processor config
    (``preprocessor_config.json`` or ``processor_config.json``). Configuration files must parse, weights
    headers must be complete, and TLM weights, when the directory has them, must fit the model. Of the
    weights only safetensors headers are read, and the TLM's own (small) tensors.

    :raises ModelError: one line naming the directory and the missing or unreadable file.
    """
    d = Path(model_dir)
    if not d.is_dir():
        raise _not_a_dir(d, "model dir")
    what = "model dir"
    _only_files_and_folders(d, what)
    missing: list[str] = []
    if not (d / "config.json").is_file():
        missing.append("config.json")
    index = d / "model.safetensors.index.json"
    shards: list[str] = ["model.safetensors"]
    if index.is_file():
        weight_map = _json_object(d, index.name, what).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ModelError(f"{what} {d}: {index.name} has no weight_map of tensor -> shard file names")
        shards = sorted(set(weight_map.values()))
        if any(not s or s in (".", "..") or Path(s).name != s for s in shards):
            raise ModelError(f"{what} {d}: {index.name} names shards outside the directory (or no name)")
        missing += [s for s in shards if not (d / s).is_file()]
    elif not (d / "model.safetensors").is_file():
        missing.append("model.safetensors (weights)")
    if not any((d / f).is_file() for f in _TOKENIZER_FILES):
        missing.append("tokenizer.json")
    if not any((d / f).is_file() for f in _PROCESSOR_FILES):
        missing.append("preprocessor_config.json")
    if missing:
        raise ModelError(
            f"{what} {d}: {', '.join(missing)} missing; pass a complete Qwen2.5-VL model directory"
        )
    config = _json_object(d, "config.json", what)
    model_type = config.get("model_type")
    if model_type != "qwen2_5_vl":
        raise ModelError(f"{what} {d}: config.json has model_type {model_type!r}, expected 'qwen2_5_vl'")
    _check_known_files(d, what)
    headers = {shard: _tensor_shapes(d / shard, what) for shard in shards}
    if index.is_file():
        for tensor, shard in _json_object(d, index.name, what)["weight_map"].items():
            if tensor not in headers[shard]:
                raise ModelError(
                    f"{what} {d}: {shard} lacks {tensor}, which {index.name} places there; restore the shard"
                )
    shapes = {k: v for header in headers.values() for k, v in header.items()}
    names = list(shapes)
    if not any("visual." in n for n in names) or not any("embed_tokens" in n for n in names):
        raise ModelError(
            f"{what} {d}: {', '.join(shards[:2])} holds no Qwen2.5-VL vision tower or token embeddings "
            "(another model's file?); restore the weights"
        )
    # the layer counts first, from the raw file: building the configuration of 1e6 layers takes seconds
    text, vision = config.get("text_config"), config.get("vision_config")
    text, vision = text if isinstance(text, dict) else config, vision if isinstance(vision, dict) else {}
    _check_counts(d, text.get("num_hidden_layers"), vision.get("depth"), shapes, what)
    qwen_config = _check_config(d, what)
    _check_sizes(d, qwen_config, shapes, what)
    _check_tlm(d, _hidden_size(config), what)
    return d


def check_adapter_dir(adapter_dir: str | Path, hidden_size: int | None = None) -> Path:
    """Check that ``adapter_dir`` holds a FUSAR-GPT checkpoint: TLM weights (``tlm.safetensors`` or the
    official ``vec64_film.pt``) that fit ``hidden_size`` (when given) and, when ``adapter_config.json`` is
    there, the peft LoRA weights; configuration files parse and safetensors headers are complete.
    Returns it as a Path.

    :raises ModelError: one line naming the directory and the missing or unreadable file.
    """
    d = Path(adapter_dir)
    what = "adapter dir"
    if not d.is_dir():
        raise _not_a_dir(d, what)
    _only_files_and_folders(d, what)
    if (d / "adapter_config.json").is_file() and not any(
        (d / f).is_file() for f in ("adapter_model.safetensors", "adapter_model.bin")
    ):
        raise ModelError(f"{what} {d}: adapter_model.safetensors missing (adapter_config.json present)")
    if not any((d / f).is_file() for f in (TLM_WEIGHTS_FILE, TLM_LEGACY_FILE)):
        raise ModelError(f"{what} {d}: {TLM_WEIGHTS_FILE} (or {TLM_LEGACY_FILE}) missing")
    _check_known_files(d, what)
    if (d / "adapter_model.safetensors").is_file():
        _tensor_shapes(d / "adapter_model.safetensors", what)
    _check_tlm(d, hidden_size, what)
    return d


def resolve_model_dirs(model: str | Path, base_model: str | Path | None = None) -> tuple[Path, Path | None]:
    """``(model_dir, adapter_dir)`` for ``--model`` (and ``--base-model``), checked.

    ``model`` is either a full model directory (``config.json``: a Qwen2.5-VL with the TLM, as written by
    :meth:`FusarGPT.save_full`, e.g. the packaged demo model) or a FUSAR-GPT checkpoint (the official
    release, or a ``fusarbatch train`` output: TLM + LoRA adapter) whose base Qwen2.5-VL directory is
    ``base_model``, else the ``base_model`` recorded in ``fusarbatch_train.json``, else the adapter's
    ``base_model_name_or_path`` when that is a local directory.

    :raises ModelError: a directory is missing, incomplete or holds an unreadable file; a full model has
        no TLM.
    :raises UsageError: ``model`` is a checkpoint whose base model is unknown (pass ``base_model``), or
        ``base_model`` is given with a full model directory.
    """
    from fusarbatch.errors import UsageError

    d = Path(model)
    if not d.is_dir():
        raise _not_a_dir(d, "--model")
    if (d / "config.json").is_file():
        if base_model is not None:
            raise UsageError(
                f"--base-model {base_model}: only for a checkpoint --model; {d} is a full model directory "
                "(it has config.json): drop --base-model"
            )
        check_model_dir(d)
        if not any((d / f).is_file() for f in (TLM_WEIGHTS_FILE, TLM_LEGACY_FILE)):
            raise ModelError(
                f"--model {d}: no TLM weights ({TLM_WEIGHTS_FILE} or {TLM_LEGACY_FILE}): a plain "
                "Qwen2.5-VL is not FUSAR-GPT; give the FUSAR-GPT checkpoint as --model and this directory "
                "as --base-model"
            )
        return d, None
    if (d / "model.safetensors").is_file() or (d / "model.safetensors.index.json").is_file():
        raise ModelError(f"--model {d}: config.json missing beside the model weights; restore it")
    if base_model is None:
        recorded_in = (
            ("fusarbatch_train.json", "base_model"),
            ("adapter_config.json", "base_model_name_or_path"),
        )
        for name, key in recorded_in:
            try:
                recorded = _json_file(d, name, "--model").get(key)
            except (OSError, ModelError, AttributeError):
                continue
            if isinstance(recorded, str) and recorded and Path(recorded).is_dir():
                base_model = recorded
                break
        else:
            if not any((d / f).is_file() for f in (TLM_WEIGHTS_FILE, TLM_LEGACY_FILE, "adapter_config.json")):
                raise ModelError(
                    f"--model {d}: neither a model directory (no config.json) nor a FUSAR-GPT checkpoint "
                    f"(no {TLM_WEIGHTS_FILE}, {TLM_LEGACY_FILE} or adapter_config.json)"
                )
            raise UsageError(
                f"--model {d}: a FUSAR-GPT checkpoint whose base model is unknown or missing; "
                "pass --base-model DIR (a local Qwen2.5-VL directory)"
            )
    base = check_model_dir(base_model)
    return base, check_adapter_dir(d, _hidden_size(_json_object(base, "config.json", "model dir")))
