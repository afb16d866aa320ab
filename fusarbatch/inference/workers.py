"""Model inference on Dask workers (DESIGN 3.5).

Each worker loads the model once (:func:`get_model`, cached per process and model; :func:`warm_model`
loads it at the start of a run) and answers batches of tiles read straight from the tile store, so only
small task arguments and answers travel through the scheduler. A batch is two tasks: :func:`prepare_tiles`
(read + render, CPU, no resource) runs on a free thread while the model answers the batch before, and
:func:`infer_prepared` asks for the resource ``GPU=1``: a worker that declares ``GPU=1`` runs one at a
time (CPU-only workers declare it too, so the same graph runs everywhere). Generation is greedy and
batched with left padding; the vision tower runs once per batch.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from fusarbatch.errors import FusarbatchError, ModelError, UsageError

log = logging.getLogger(__name__)

GPU_RESOURCE = {"GPU": 1}


@dataclass(frozen=True)
class ModelSpec:
    """Which model a worker loads and how it generates."""

    model_dir: str
    adapter_dir: str | None = None
    device: str | None = None
    """``cuda``, ``cpu`` or None (CUDA when available, else CPU)."""
    max_new_tokens: int = 128
    batch_size: int = 8
    engine: str = "hf"
    """``hf`` (transformers ``generate``) or ``vllm`` (:mod:`fusarbatch.engines.vllm_engine`)."""


@dataclass(frozen=True)
class TaskSpec:
    """What to ask about every tile."""

    labels: tuple[str, ...] = ("ship",)
    """One detection prompt per label."""
    classes: tuple[str, ...] = ()
    """Choices of the tile classification prompt (whole tile as the box); empty: no classification."""
    render_mode: str = "grey"


@dataclass
class TileAnswer:
    """The parsed answers for one tile (boxes on the model's ``grid`` x ``grid`` input)."""

    tile_id: int
    grid: int = 504
    """Side of the model's input in pixels (:attr:`fusarbatch.model.FusarGPT.image_size`): the boxes are on
    this grid."""
    boxes: list[Any] = field(default_factory=list)
    """:class:`fusarbatch.model.prompts.Box` list, all labels; ``box.label`` is the label asked for (the
    detection prompt that produced the box), whatever the model wrote."""
    scores: list[float | None] = field(default_factory=list)
    """Per box: its own confidence in [0, 1], the geometric mean of the probabilities of the tokens of its
    coordinates (:mod:`fusarbatch.model.confidence`); None if they cannot be found."""
    answer_scores: list[float | None] = field(default_factory=list)
    """Per box: probability of the whole generated answer it came from (shared by the answer's boxes)."""
    model_labels: list[str] = field(default_factory=list)
    """Per box: the label the model wrote (may differ from the one asked for)."""
    scene_class: str | None = None
    errors: list[str] = field(default_factory=list)
    """Parse failures and truncations, ``"<task>: <reason>"``."""
    raw: dict[str, str] = field(default_factory=dict)


@dataclass
class BatchResult:
    """What one model task returns: the answers and how long ``generate`` took (seconds)."""

    answers: list[TileAnswer]
    generate_s: float
    prompts: int


_models: dict[ModelSpec, Any] = {}
_models_lock = threading.Lock()
_logits_checked: set[ModelSpec] = set()


def resolve_device(device: str | None, *, require_gpu: bool = False) -> str:
    """``cuda`` when asked for (or by default) and present; CPU otherwise, with a warning if a GPU was asked.

    :raises UsageError: ``require_gpu`` (``--require-gpu``) and no CUDA device is visible.
    """
    import torch

    has_cuda = torch.cuda.is_available()
    if require_gpu and not has_cuda:
        raise UsageError("--require-gpu: no CUDA device is visible; run on a GPU node or drop --require-gpu")
    if device is None:
        return "cuda" if has_cuda else "cpu"
    if device.startswith("cuda") and not has_cuda:
        log.warning("device %s asked for but no CUDA device is visible: running on CPU", device)
        return "cpu"
    if device == "mps" and not torch.backends.mps.is_available():
        log.warning("device mps asked for but this machine has no MPS (Apple GPU): running on CPU")
        return "cpu"
    return device


def get_model(spec: ModelSpec) -> Any:
    """The worker's :class:`~fusarbatch.model.FusarGPT` for ``spec``, loaded on first use and kept."""
    with _models_lock:
        model = _models.get(spec)
        if model is None:
            from transformers.utils import logging as hf_logging

            from fusarbatch.model.fusar_gpt import FusarGPT

            hf_logging.disable_progress_bar()
            # its load report prints tensor names (untrusted) raw; FusarGPT.from_pretrained reports instead
            hf_logging.set_verbosity_error()
            if spec.engine == "vllm":
                from fusarbatch.engines.vllm_engine import VllmFusarGPT

                model = VllmFusarGPT.from_pretrained(
                    spec.model_dir,
                    adapter_dir=spec.adapter_dir,
                    device=spec.device,
                    max_num_seqs=max(1, spec.batch_size * 2),
                    max_new_tokens=spec.max_new_tokens,
                )
            else:
                model = FusarGPT.from_pretrained(
                    spec.model_dir, adapter_dir=spec.adapter_dir, device=spec.device
                )
            _models[spec] = model
        return model


def warm_model(spec: ModelSpec) -> str:
    """Load the worker's model now (a Dask task, submitted once per GPU worker at the start of a run, so
    that loading the weights overlaps the search and the tiling of the first scene instead of delaying
    its first batch: seconds for the tiny model, a minute or more for 7B). Returns the device."""
    get_model(spec)
    return spec.device


def _read_tiles(store: str, group: str, tile_ids: Sequence[int]) -> dict[str, Any]:
    import zarr

    g = zarr.open_group(str(Path(store) / group), mode="r", zarr_format=3)
    ids = np.asarray(tile_ids)
    out: dict[str, Any] = {
        "backscatter": g["backscatter"].get_orthogonal_selection(
            (ids, slice(None), slice(None), slice(None))
        ),
        "pols": list(g.attrs["pols"]),
        "units": str(g.attrs.get("units", "dB")),
    }
    names = set(g.array_keys())
    if g.attrs.get("aef_complete") and {"aef_features", "aef_positions", "aef_mask"} <= names:
        out["aef"] = tuple(
            g[n].get_orthogonal_selection((ids,)) for n in ("aef_features", "aef_positions", "aef_mask")
        )
    return out


@dataclass
class PreparedTiles:
    """Model inputs of one batch of tiles, made by :func:`prepare_tiles` (CPU) for :func:`infer_prepared`
    (GPU): ``images`` RGB at the model's input size (:func:`fusarbatch.render.render`), ``anchors`` per
    tile (None: no AEF features stored)."""

    group: str
    tile_ids: list[int]
    images: list[Any]
    anchors: list[Any]


def prepare_tiles(
    store: str,
    group: str,
    tile_ids: Sequence[int],
    render_mode: str = "grey",
    _after: Any = None,
    size: int = 504,
) -> PreparedTiles:
    """Read ``backscatter`` and, when complete, ``aef_*`` of the tiles from ``<store>/<group>`` and render
    them at ``size`` x ``size`` (the model's input size, :func:`fusarbatch.model.fusar_gpt.model_image_size`:
    one resampling from the tile). A Dask task without the GPU resource: it runs on a free worker thread
    while the model answers the batch before (``_after``, ignored, only orders it behind an earlier batch,
    so that a scene of thousands of tiles is not rendered all at once into memory)."""
    from fusarbatch.model.tlm import Anchors
    from fusarbatch.render import render

    data = _read_tiles(store, group, tile_ids)
    images = [
        render(t, data["pols"], units=data["units"], mode=render_mode, size=size) for t in data["backscatter"]
    ]
    if "aef" in data:
        feats, pos, mask = data["aef"]
        anchors = [Anchors.of(feats[i].astype(np.float32), pos[i], mask[i]) for i in range(len(tile_ids))]
    else:
        anchors = [None] * len(tile_ids)
    return PreparedTiles(group, [int(t) for t in tile_ids], images, anchors)


def infer_prepared(model_spec: ModelSpec, task: TaskSpec, prepared: PreparedTiles) -> BatchResult:
    """Run every task on one prepared batch of tiles; never raises on model output.

    Asks one detection prompt per label and, if ``task.classes``, one classification prompt with the
    whole tile as the box, through the worker's engine (``generate_tiles``): each image is processed once
    for all its prompts; the ``hf`` engine batches the prompts ``model_spec.batch_size`` at a time through
    ``generate``, the ``vllm`` engine hands all of them to vLLM's scheduler at once. Everything is on the
    model's own grid (:attr:`~fusarbatch.model.FusarGPT.image_size`): the images are resized to it, the
    classification box is the whole grid, boxes are parsed on it and the answers carry it
    (:attr:`TileAnswer.grid`) for placing them. Each box gets its own score
    (:mod:`fusarbatch.model.confidence`) and the answer's probability.
    """
    from fusarbatch.model.confidence import box_confidences
    from fusarbatch.model.prompts import (
        classification_prompt,
        detection_prompt,
        parse_class,
        parse_detection,
    )

    model = get_model(model_spec)
    grid = int(model.image_size)
    images, anchors, tile_ids = prepared.images, prepared.anchors, prepared.tile_ids
    if model_spec not in _logits_checked and images and hasattr(model, "forward"):
        # the hf engine's own forward; the vllm engine keeps no PyTorch copy of the language model
        check_logits(model, model_spec, images[0], detection_prompt(task.labels[0]), anchors[0])
        _logits_checked.add(model_spec)
    answers = [TileAnswer(tile_id=int(t), grid=grid) for t in tile_ids]
    asks: list[tuple[str, str]] = [(f"detect:{label}", detection_prompt(label)) for label in task.labels]
    if task.classes:
        asks.append(("classify", classification_prompt([0, 0, grid, grid], task.classes, grid=grid)))
    t0 = time.perf_counter()
    # each image is processed once for all its prompts; the engine batches (hf) or schedules (vllm) them
    per_tile = model.generate_tiles(
        images,
        anchors,
        [[p for _, p in asks]] * len(tile_ids),
        max_new_tokens=model_spec.max_new_tokens,
        batch_size=model_spec.batch_size,
    )
    generate_s = time.perf_counter() - t0
    for i, gens in enumerate(per_tile):
        for (kind, _), gen in zip(asks, gens, strict=True):
            ans = answers[i]
            ans.raw[kind] = gen.text[:2000]
            if not gen.finished:
                ans.errors.append(f"{kind}: answer cut at max_new_tokens={model_spec.max_new_tokens}")
            if kind == "classify":
                res = parse_class(gen.text, task.classes)
                ans.scene_class = res.value
            else:
                label = kind.split(":", 1)[1]
                res = parse_detection(gen.text, default_label=label, grid=grid)
                answer_score = float(np.exp(gen.logprob)) if np.isfinite(gen.logprob) else None
                scores = (
                    box_confidences(gen.token_logprobs, model.token_spans(gen), res.spans)
                    if res.value
                    else []
                )
                for box, score in zip(res.value, scores, strict=True):
                    # the answer to "detect: {label}" is a {label} box; what the model called it is kept
                    ans.boxes.append(replace(box, label=label))
                    ans.scores.append(score)
                    ans.answer_scores.append(answer_score)
                    ans.model_labels.append(str(box.label))
            if not res.ok:
                ans.errors.append(f"{kind}: {res.error}")
    return BatchResult(answers, generate_s, len(asks) * len(tile_ids))


def check_logits(model: Any, spec: ModelSpec, image: Any, prompt: str, anchors: Any) -> None:
    """One forward pass on one tile of a worker's first batch: no logit may be NaN or +inf, and no position
    may have every logit -inf (a token masked with -inf is allowed). A model with NaN (or infinite) weights
    otherwise generates garbage that parses as "no target", and a run would end "done" with 0 detections,
    replacing good outputs.

    :raises ModelError: the logits are broken (one line naming the model).
    """
    import torch

    inputs = model.build_inputs([image], [prompt], image_size=model.image_size)
    with torch.inference_mode():
        logits = model.forward([anchors], **inputs).logits.float()
    bad = int((torch.isnan(logits) | torch.isposinf(logits)).sum())
    bad += int(torch.isneginf(logits).all(dim=-1).sum()) * logits.shape[-1]
    if bad:
        name = spec.adapter_dir or spec.model_dir
        raise ModelError(
            f"model {name}: {bad} of {logits.numel()} logits of the first batch are NaN or infinite (NaN or "
            "infinite weights?); restore or retrain the model"
        )


def start_client(
    scheduler: str | None,
    *,
    workers: int = 1,
    connect_timeout_s: float = 20.0,
    gpu: bool = True,
    dashboard: bool = False,
) -> tuple[Any, Any]:
    """A Dask client: joins ``scheduler`` (``tcp://host:port``) or starts a LocalCluster.

    The LocalCluster has ``workers`` worker(s) declaring ``GPU=1`` (one per GPU; with dask-cuda installed and
    several GPUs visible, a ``LocalCUDACluster`` with one worker per GPU). Threads, not processes, so that
    start-up is quick and the model stays in this process on a single node. It listens on 127.0.0.1 only
    (the scheduler, the workers and their HTTP servers, each on a free port); the dashboard is served only
    with ``dashboard=True`` (its address is logged).

    Before a :class:`distributed.Client` is made for ``scheduler``, one Dask message (``identity``) must
    come back within ``connect_timeout_s``: a port that accepts and never answers, or a server that is not
    a Dask scheduler (e.g. HTTP), fails there (the Client's own handshake waits for ever).

    :param gpu: whether the run's tasks ask for the ``GPU`` resource (the model engine). False (the CFAR
        engine): a joined scheduler needs no GPU worker, and no ``LocalCUDACluster`` is made (torch is
        not imported).

    :returns: ``(client, cluster)``; ``cluster`` is None when joining an existing scheduler.
    :raises FusarbatchError: the scheduler cannot be reached within ``connect_timeout_s``, is not a Dask
        scheduler, or has no worker with the ``GPU`` resource.
    """
    from distributed import Client, LocalCluster

    if scheduler:
        from distributed.comm.addressing import parse_address, parse_host_port

        try:
            scheme, location = parse_address(scheduler)
            if scheme in ("tcp", "tls"):
                parse_host_port(location)
        except ValueError as exc:
            raise UsageError(
                f"--scheduler {scheduler!r}: not a scheduler address ({exc}); give e.g. tcp://host:8786"
            ) from None
        _probe_scheduler(scheduler, connect_timeout_s)
        try:
            client = Client(scheduler, timeout=f"{connect_timeout_s}s")
        except (OSError, TimeoutError) as exc:
            raise FusarbatchError(
                f"--scheduler {scheduler}: cannot connect within {connect_timeout_s:.0f} s "
                f"({type(exc).__name__}); check the address and that `dask scheduler` is running"
            ) from None
        workers_info = client.scheduler_info().get("workers", {})
        if gpu and not any(w.get("resources", {}).get("GPU", 0) >= 1 for w in workers_info.values()):
            client.close()
            raise FusarbatchError(
                f"--scheduler {scheduler}: no worker declares the GPU resource; start workers with "
                "`dask worker ADDRESS --resources GPU=1` (CPU-only workers too)"
            )
        return client, None
    cluster = None
    if gpu:
        try:
            import torch

            if torch.cuda.device_count() > 1:
                from dask_cuda import LocalCUDACluster  # type: ignore[import-not-found]

                cluster = LocalCUDACluster(
                    resources=GPU_RESOURCE, threads_per_worker=2, host=LOOPBACK, **_http_kwargs(dashboard)
                )
        except ImportError:
            cluster = None
    if cluster is None:
        cluster = LocalCluster(  # in-process (inproc://): only the HTTP servers listen, on loopback
            n_workers=workers,
            threads_per_worker=2,
            processes=False,
            resources=GPU_RESOURCE,
            **_http_kwargs(dashboard),
        )
    client = Client(cluster)
    if dashboard:
        port = client.scheduler_info().get("services", {}).get("dashboard")
        log.info("Dask dashboard: http://%s:%s/status", LOOPBACK, port)
    return client, cluster


LOOPBACK = "127.0.0.1"


def _http_kwargs(dashboard: bool) -> dict[str, Any]:
    """LocalCluster arguments for its HTTP servers: every one on 127.0.0.1 and a free port. Dask starts an
    HTTP server (health, metrics) even without a dashboard, on every interface and port 8787 when not
    told otherwise."""
    address = f"{LOOPBACK}:0"
    return {
        "dashboard_address": address if dashboard else None,
        "worker_dashboard_address": address,
        "scheduler_kwargs": {"dashboard": dashboard, "dashboard_address": address},
    }


def _probe_scheduler(address: str, timeout_s: float) -> None:
    """Send one ``identity`` message to ``address`` and wait, at most ``timeout_s`` in all, for a Dask
    scheduler's answer.

    :raises FusarbatchError: no answer in time, or an answer that is not a Dask scheduler's.
    """
    import asyncio

    from distributed.comm import connect
    from distributed.security import Security

    args = Security().get_connection_args("client")  # TLS settings from the Dask config, as a Client's

    async def identity() -> Any:
        comm = await connect(address, timeout=timeout_s, **args)
        try:
            await comm.write({"op": "identity", "reply": True})
            return await comm.read()
        finally:
            comm.abort()

    try:
        answer = asyncio.run(asyncio.wait_for(identity(), timeout_s))
    except (OSError, TimeoutError) as exc:
        raise FusarbatchError(
            f"--scheduler {address}: cannot connect within {timeout_s:.0f} s ({type(exc).__name__}); check "
            "the address and that `dask scheduler` is running"
        ) from None
    except Exception as exc:  # a peer that is not Dask: the comm closes, or sends what Dask cannot read
        answer = exc
    if not (isinstance(answer, dict) and answer.get("type") == "Scheduler"):
        raise FusarbatchError(
            f"--scheduler {address}: the server there did not answer as a Dask scheduler "
            f"({type(answer).__name__}); give the address of `dask scheduler` (tcp://host:8786)"
        )
