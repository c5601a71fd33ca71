"""`ellava plan`: the memory of every step of a search, from compiled programs, before a run.

Each step's program is lowered with abstract arrays (`jax.ShapeDtypeStruct`: nothing is
allocated, no weight or data file is read) for the recipe's model and sizes, compiled for the
backend at hand, and read with `memory_analysis()`: the per-device peak of the program
(arguments + outputs + temporaries - aliased). Beside it, what the step keeps on the device
outside that program (the model's parameters, the calibration set, the KL targets, the level
database when it lives there), so a step's total is what the device must hold at once.

Steps (the order a search runs them):
  calibration     one decoder layer and its Gram matrices on a chunk of `calib_batch_size` rows
  database        SparseGPT at every level for the largest matrix (the level database's OBS)
  fitness         the population's decoder pass on each proxy part (scanned, or one streamed
                  layer step and the head), `population` candidates
  projector       the projector's training on the multimodal samples (top_k candidates): all
                  steps in one scanned program, or streamed, one layer forward / backward
  final_prune     one sequential SparseGPT call on the largest matrix (calibration as above)
  evaluation      one forward pass of an evaluation batch

A CPU compile estimates an accelerator's buffers (its fusion and layouts differ); the backend
is named in the output.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from functools import partial

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as PS

from ellava_jax.config import LlavaConfig
from ellava_jax.mesh import data_spec, kernel_spec, param_specs, state_spec
from ellava_jax.prune.masks import MATRICES, matrix_shape, matrix_size

GB = 1e9
EVAL_BATCH = 8
EVAL_TEXT_ONLY = (16, 256)  # held-out perplexity windows: rows x tokens


@dataclasses.dataclass
class Step:
    name: str
    program: int  # the compiled program's peak (bytes per device)
    held: int  # live on the device outside the program during this step
    note: str = ""

    @property
    def total(self) -> int:
        return self.program + self.held


# the mesh a plan is compiled for (None: one device); read by the abstract-array helpers below
_MESH: contextvars.ContextVar = contextvars.ContextVar("plan_mesh", default=None)


def _sds(shape, dtype, spec=None) -> jax.ShapeDtypeStruct:
    """An abstract array; on a mesh, split as `spec` (None: replicated)."""
    shape, dtype = tuple(int(x) for x in shape), jnp.dtype(dtype)
    mesh = _MESH.get()
    if mesh is None:
        return jax.ShapeDtypeStruct(shape, dtype)
    return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, spec or PS()))


def _rows(shape, dtype) -> jax.ShapeDtypeStruct:
    """An abstract array whose leading axis (candidates, or rows) goes over the data axis."""
    mesh = _MESH.get()
    return _sds(shape, dtype, None if mesh is None else data_spec(shape[0], mesh, len(shape)))


def _state(shape, dtype) -> jax.ShapeDtypeStruct:
    """The population's hidden state [P, N, T, H], split as `mesh.population_state` splits it."""
    mesh = _MESH.get()
    return _sds(shape, dtype, None if mesh is None else state_spec(shape, mesh))


def _head_chunk(p, rows, t, hid, vocab, dtype, kl) -> tuple:
    """The head's arguments for one chunk of rows: final hidden states of p candidates, labels,
    label mask and (KL) the chunk's targets."""
    logp = _sds((rows, t, vocab), jnp.float32) if kl else None
    h = _rows((p, rows, t, hid), dtype)
    return h, _sds((rows, t), jnp.int32), _sds((rows, t), jnp.float32), logp


def _kernels(config, stacks: dict) -> dict:
    """Abstract level stacks ({matrix: [..., in, out]}), split like their weights on a mesh."""
    mesh = _MESH.get()
    return {
        m: _sds(
            x.shape, x.dtype, None if mesh is None else kernel_spec(config, m, len(x.shape), mesh)
        )
        for m, x in stacks.items()
    }


def _params(config, dtype) -> dict:
    """The model's abstract params, placed on the mesh as a search places them."""
    from ellava_jax.model.llava import param_shapes

    params = param_shapes(config, dtype)
    mesh = _MESH.get()
    if mesh is None:
        return jax.tree.map(lambda x: _sds(x.shape, x.dtype), params)
    specs = param_specs(config, params, mesh)
    return jax.tree.map(lambda x, s: _sds(x.shape, x.dtype, s), params, specs)


def _nbytes(tree) -> int:
    """Bytes per device (a split array counts its shard)."""
    total = 0
    for x in jax.tree.leaves(tree):
        shape = x.shape
        sharding = getattr(x, "sharding", None)
        if sharding is not None:
            shape = sharding.shard_shape(shape)
        total += math.prod(shape) * jnp.dtype(x.dtype).itemsize
    return int(total)


def program_peak(jitted, *args, resident: int = 0) -> int:
    """Per-device peak bytes of `jitted` compiled for `args` (abstract arrays), less
    `resident`: the bytes of arguments that stay on the device anyway (the parameters, an
    on-device database), which a step counts once, as held outside the program (such a program
    is jitted with `keep_unused=True`: jit would otherwise drop the arguments it does not read
    and their bytes would be taken out twice)."""
    m = jitted.lower(*args).compile().memory_analysis()
    if m is None:  # a backend without the analysis
        return 0
    return int(
        m.argument_size_in_bytes
        + m.output_size_in_bytes
        + m.temp_size_in_bytes
        - m.alias_size_in_bytes
        - resident
    )


def _chunk_note(settings) -> str:
    out = ""
    if settings.candidate_chunk is not None:
        out += f", blocks of {settings.candidate_chunk} candidates"
    if settings.row_chunk is not None:
        out += f", {settings.row_chunk} rows per block"
    return out


@dataclasses.dataclass(frozen=True)
class Shapes:
    """The sizes a search runs at (from the recipe, or told)."""

    text_rows: int
    text_len: int
    mm_rows: int  # 0: no multimodal part (text-only model or no multimodal proxy)
    mm_len: int
    population: int
    top_k: int
    levels: int

    @property
    def calib_len(self) -> int:
        return max(self.text_len, self.mm_len if self.mm_rows else 0)

    @property
    def calib_rows(self) -> int:
        return self.text_rows + self.mm_rows


def search_shapes(settings, config: LlavaConfig, image_tokens: int, text_tokens: int) -> Shapes:
    """The proxy parts of `settings` for `config`; a multimodal part when the model has images
    and the recipe names a multimodal file (or is the toy's own, `proxy_multimodal` null with a
    model of images): `proxy_multimodal_samples` rows of image + text tokens."""
    mm = not config.is_text_only and settings.projector_steps > 0
    n_img = config.num_image_tokens if config.num_image_tokens else image_tokens
    levels = int(round(settings.width / settings.step)) * 2 + 1
    return Shapes(
        settings.proxy_segments,
        settings.proxy_seq_len,
        settings.proxy_multimodal_samples if mm else 0,
        min(n_img, image_tokens) + text_tokens if mm else 0,
        settings.population,
        settings.top_k,
        levels,
    )


def _largest_matrices(config: LlavaConfig) -> list[str]:
    """One matrix per distinct [in, out] shape."""
    seen, out = set(), []
    for m in MATRICES:
        s = matrix_shape(config, m)
        if s not in seen:
            seen.add(s)
            out.append(m)
    return out


def _calibration_step(config, dtype, shapes, batch) -> Step:
    from ellava_jax.prune.hessian import _layer_stats

    t, cfg = shapes.calib_len, config.text
    layer = _layer_abstract(config, dtype)
    h = _rows((batch, t, cfg.hidden_size), dtype)
    mask, pos = _rows((batch, t), jnp.int32), _rows((batch, t), jnp.int32)
    fn = jax.jit(lambda lp, h, mask, pos: _layer_stats(cfg, lp, h, mask, pos, True))
    peak = program_peak(fn, layer, h, mask, pos)
    # held: the calibration set's hidden states in and out, and one layer's Hessians
    hidden = 2 * _nbytes(_rows((shapes.calib_rows, t, cfg.hidden_size), dtype))
    i, hh = cfg.intermediate_size, cfg.hidden_size
    qd = cfg.num_attention_heads * cfg.head_dim
    hess = 4 * (2 * hh * hh + qd * qd + i * i)
    return Step("calibration", peak, hidden + hess, f"{batch} rows x {t} tokens per chunk")


def _layer_abstract(config, dtype) -> dict:
    """One decoder layer's abstract params (split like the stacked ones on a mesh)."""
    stack = _params(config, dtype)["language_model"]["layers"]

    def one(x):
        spec = getattr(x, "sharding", None)
        return _sds(x.shape[1:], x.dtype, None if spec is None else PS(*spec.spec[1:]))

    return jax.tree.map(one, stack)


def _obs_peak(config, dtype, n_levels: int) -> int:
    from ellava_jax.prune.database import _prune_levels

    peak = 0
    for m in _largest_matrices(config):
        a, b = matrix_shape(config, m)
        k = _kernels(config, {m: _sds((a, b), dtype)})[m]
        h = _sds((a, a), jnp.float32)
        if n_levels > 1:
            peak = max(peak, program_peak(_prune_levels, k, h, _sds((n_levels,), jnp.float32)))
        else:
            from ellava_jax.prune.obs import sparsegpt

            peak = max(
                peak, program_peak(jax.jit(lambda k, h, s: sparsegpt(k, h, s)[0]), k, h, 0.5)
            )
    return peak


def plan(
    settings,
    config: LlavaConfig,
    *,
    dtype="bfloat16",
    device_memory: float | None = None,
    image_tokens: int = 576,
    text_tokens: int = 64,
    mesh=None,
) -> dict:
    """Every step's per-device bytes for `settings` on `config`, compiled with abstract arrays.

    `mesh` (a jax Mesh; None: one device): arrays are split as a search splits them
    (`ellava_jax.mesh`) and each figure is per device of that mesh; host bytes are per host.
    Returns {"steps": {name: total bytes}, "detail": {name: {program, held, note}},
    "host_bytes": {...}, "h2d_bytes_per_round": int, "backend": str, "fits": bool | None,
    "device_memory": bytes | None, "shapes": {...}, "mesh": {axis: size} | None}."""
    token = _MESH.set(mesh)
    try:
        with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
            out = _plan(settings, config, dtype, device_memory, image_tokens, text_tokens)
    finally:
        _MESH.reset(token)
    out["mesh"] = None if mesh is None else dict(mesh.shape)
    return out


def _plan(settings, config, dtype, device_memory, image_tokens, text_tokens) -> dict:
    from ellava_jax.search import fitness as F
    from ellava_jax.search import projector as P
    from ellava_jax.search.projector import MultimodalProxy

    dtype = jnp.dtype(dtype)
    cfg = config.text
    shapes = search_shapes(settings, config, image_tokens, text_tokens)
    params = _params(config, dtype)
    param_bytes = _nbytes(params)
    n_layers, hid = cfg.num_hidden_layers, cfg.hidden_size
    stacks_all = _kernels(
        config,
        {m: _sds((n_layers, shapes.levels, *matrix_shape(config, m)), dtype) for m in MATRICES},
    )
    db_bytes = _nbytes(stacks_all)  # per device: split like the weights on a mesh
    mesh = _MESH.get()
    n_dev = 1 if mesh is None else mesh.size
    linears = sum(matrix_size(config, m) for m in MATRICES) * n_layers
    db_host = shapes.levels * linears * dtype.itemsize  # the whole database, in host memory
    db_on_device = settings.database_storage == "device"
    vocab = cfg.vocab_size
    # KL targets (float32 log-probs over the vocabulary) live in host memory
    kl_fitness_bytes = 0
    if settings.fitness_loss == "kl":
        kl_fitness_bytes = shapes.text_rows * shapes.text_len + shapes.mm_rows * shapes.mm_len
    kl_bytes = kl_fitness_bytes
    if shapes.mm_rows and settings.fitness_loss != "kl" and settings.projector_loss == "kl":
        kl_bytes += shapes.mm_rows * shapes.mm_len
    kl_fitness_bytes *= vocab * 4
    kl_bytes *= vocab * 4

    steps: list[Step] = []
    steps.append(_calibration_step(config, dtype, shapes, settings.calib_batch_size))
    steps[-1].held += param_bytes
    obs = _obs_peak(config, dtype, shapes.levels - 1)
    held_db = db_bytes if db_on_device else 0
    steps.append(
        Step(
            "database",
            obs,
            held_db + steps[0].held,
            f"{shapes.levels - 1} levels of the largest matrix; database "
            + ("on the device" if db_on_device else "on the host"),
        )
    )

    # fitness: each part's pass for the whole population
    p = shapes.population
    stacks_one = _kernels(config, {m: _sds(x.shape[1:], dtype) for m, x in stacks_all.items()})
    shared = {
        k: {"scale": _sds((hid,), dtype)} for k in ("input_layernorm", "post_attention_layernorm")
    }
    chunks = (settings.candidate_chunk, settings.row_chunk)
    parts = [(shapes.text_rows, shapes.text_len, settings.fitness_loss == "kl")]
    if shapes.mm_rows:
        parts.append((shapes.mm_rows, shapes.mm_len, settings.fitness_loss == "kl"))
    fit_peak = 0
    for n, t, kl in parts:
        rc = n if settings.row_chunk is None else min(n, settings.row_chunk)
        mask = _sds((n, t), jnp.int32)
        if settings.streaming:
            lv = _sds((p, len(MATRICES)), jnp.int32)
            h = _state((p, n, t, hid), dtype)
            layer = program_peak(
                jax.jit(partial(F._layer_step, cfg, chunks=chunks), donate_argnums=3),
                shared,
                stacks_one,
                lv,
                h,
                mask,
            )
            # the head, one chunk of rows (and its KL targets) at a time, beside the whole h
            head = program_peak(
                jax.jit(partial(F._head_loss_sums, config), keep_unused=True),
                params,
                *_head_chunk(p, rc, t, hid, vocab, dtype, kl),
                resident=param_bytes,
            ) + _nbytes(h)
            fit_peak = max(fit_peak, layer, head)
        else:
            lv = _sds((p, n_layers, len(MATRICES)), jnp.int32)
            fn = jax.jit(
                lambda *a: F.population_sums_jit(config, *a, chunks=chunks), keep_unused=True
            )
            args = (
                params,
                stacks_all,
                lv,
                _sds((n, t, hid), dtype),
                mask,
                _sds((n, t), jnp.int32),
                _sds((n, t), jnp.float32),
                _sds((n, t, vocab), jnp.float32) if kl else None,
            )
            fit_peak = max(fit_peak, program_peak(fn, *args, resident=param_bytes + held_db))
    steps.append(
        Step(
            "fitness",
            fit_peak,
            param_bytes + (held_db if not settings.streaming else 0),
            ("one streamed layer and the head" if settings.streaming else "the scanned decoder")
            + f", {p} candidates"
            + _chunk_note(settings),
        )
    )

    proj_h2d, proj_host = 0, 0
    if shapes.mm_rows:
        m = shapes.top_k
        n, t = shapes.mm_rows, shapes.mm_len
        n_img = config.num_image_tokens
        feat = config.vision.hidden_size * len(config.feature_layers)
        kl = settings.projector_loss == "kl"
        mm = MultimodalProxy(
            _sds((n, t), jnp.int32),
            _sds((n, t), jnp.int32),
            _sds((n, t, hid), dtype),
            _sds((n, n_img, feat), dtype),
            _sds((n, t), jnp.int32),
            _sds((n, t), jnp.float32),
            _sds((n, t, vocab), jnp.float32) if kl else None,
        )
        proj = params["multi_modal_projector"]
        steps_n = int(settings.projector_steps)
        h = _state((m, n, t, hid), dtype)
        if settings.streaming:
            lv = _sds((m, len(MATRICES)), jnp.int32)
            mask = _sds((n, t), jnp.int32)
            fwd = program_peak(
                jax.jit(
                    partial(F._layer_step, cfg, chunks=chunks),
                    donate_argnums=3 if settings.projector_offload else (),
                ),
                shared,
                stacks_one,
                lv,
                h,
                mask,
            )
            bwd = program_peak(
                jax.jit(lambda *a: P._layer_vjp(cfg, *a, chunks=chunks)),
                shared,
                stacks_one,
                lv,
                h,
                mask,
                h,
            )
            rc = n if settings.row_chunk is None else min(n, settings.row_chunk)
            head = program_peak(
                jax.jit(partial(P._head_grad, config), keep_unused=True),
                params,
                *_head_chunk(m, rc, t, hid, vocab, dtype, kl),
                _sds((m,), jnp.float32),
                resident=param_bytes,
            ) + 2 * _nbytes(h)  # beside it: the last layer's output and its cotangent
            inputs = n_layers * _nbytes(h)  # every layer's input, kept for the backward pass
            held = param_bytes + _nbytes(mm) - (_nbytes(mm.dense_logp) if kl else 0)
            where = "host" if settings.projector_offload else "device"
            if settings.projector_offload:
                proj_host = n_layers * math.prod(h.shape) * dtype.itemsize  # one copy, whole
                proj_h2d += steps_n * inputs
            else:
                held += inputs
            if not db_on_device:
                proj_h2d += steps_n * 2 * db_bytes  # each layer's stacks, forward and backward
            if kl:
                proj_h2d += steps_n * _nbytes(mm.dense_logp)
            steps.append(
                Step(
                    "projector",
                    max(fwd, bwd, head),
                    held,
                    f"{m} candidates x {n} samples x {t} tokens, streamed"
                    + _chunk_note(settings)
                    + f", layer inputs on the {where} ({inputs / GB:.1f} GB)",
                )
            )
        else:
            lv = _sds((m, n_layers, len(MATRICES)), jnp.int32)
            fn = jax.jit(
                lambda proj, params, stacks, lv, w, mm: P._train(
                    proj, config, steps_n, 1e-4, params, stacks, lv, w, [mm], chunks=chunks
                ),
                keep_unused=True,
            )
            peak = program_peak(
                fn,
                proj,
                params,
                stacks_all,
                lv,
                _sds((m,), jnp.float32),
                mm,
                resident=param_bytes + held_db,
            )
            if kl:
                proj_h2d += _nbytes(mm.dense_logp)
            steps.append(
                Step(
                    "projector",
                    peak,
                    param_bytes + held_db,
                    f"{m} candidates x {n} samples x {t} tokens, the scanned decoder"
                    + _chunk_note(settings),
                )
            )

    steps.append(
        Step(
            "final_prune",
            max(_obs_peak(config, dtype, 1), steps[0].program),
            steps[0].held,
            "sequential SparseGPT of the largest matrix, or the calibration chunk",
        )
    )

    steps.append(evaluation_step(config, dtype, text_tokens))

    # per round: each fitness part's pass (a streamed one reads every layer's stacks once;
    # the text part is scored for new policies only, counted here as every round) and its KL
    # targets, and the projector step's
    # (summed over the mesh's devices: a replicated array crosses to each of them)
    fit_h2d = 0 if db_on_device else len(parts) * db_bytes
    fit_h2d += kl_fitness_bytes
    host = {
        "level_database": 0 if db_on_device else db_host,
        "kl_targets": kl_bytes,
        "projector_layer_inputs": proj_host,
        "parameters": sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(params)),
    }
    limit = None if device_memory is None else int(device_memory)
    dev = jax.devices()[0]
    return {
        "steps": {s.name: s.total for s in steps},
        "detail": {s.name: {"program": s.program, "held": s.held, "note": s.note} for s in steps},
        "host_bytes": host,
        "h2d_bytes_per_round": (fit_h2d + proj_h2d) * n_dev,
        "backend": f"{jax.default_backend()} ({dev.device_kind})",
        "device_memory": limit,
        "fits": None if limit is None else all(s.total <= limit for s in steps),
        "dtype": str(dtype),
        "shapes": dataclasses.asdict(shapes),
        "kl_target_bytes": kl_bytes,
    }


def evaluation_step(config: LlavaConfig, dtype, text_tokens: int, two_layers=None) -> Step:
    """One forward pass of an evaluation batch: the model's parameters held, the program's own
    buffers beside them.

    A CPU compile of a 16-bit model converts every layer's stacked weights to float32 ahead of
    the scanned decoder loop (XLA:CPU computes bfloat16 dots in float32; an accelerator keeps
    them in bfloat16): at 13B that alone is 53 GB no GPU allocates. There (`two_layers` None:
    the backend decides) the program is compiled at depth 2 (a loop of one step is compiled
    away), two layers' upcast included: the scanned decoder's buffers do not grow with depth
    (tests/test_plan.py), its weights are held."""
    from ellava_jax.model.llava import _forward

    dtype = jnp.dtype(dtype)
    if two_layers is None:
        two_layers = jax.default_backend() == "cpu" and dtype.itemsize < 4
    if config.is_text_only:
        b, t = EVAL_TEXT_ONLY
        pix = None
    else:
        b, t = EVAL_BATCH, config.num_image_tokens + text_tokens
        v = config.vision
        pix = _rows((b, v.num_channels, v.image_size, v.image_size), jnp.float32)
    ids, mask = _rows((b, t), jnp.int32), _rows((b, t), jnp.int32)
    compiled = config
    if two_layers:
        depth = min(2, config.text.num_hidden_layers)
        compiled = dataclasses.replace(
            config, text=dataclasses.replace(config.text, num_hidden_layers=depth)
        )
    params = _params(compiled, dtype)
    ev = program_peak(
        jax.jit(partial(_forward, compiled), keep_unused=True),
        params,
        ids,
        pix,
        mask,
        resident=_nbytes(params),
    )
    note = f"{b} rows x {t} tokens"
    if two_layers:
        note += " (CPU, 16-bit: compiled at depth 2, see ellava_jax/plan.py)"
    return Step("evaluation", ev, _nbytes(_params(config, dtype)), note)


def parse_bytes(text: str) -> int:
    """'80GB', '80 GB', '16GiB', '72e9' -> bytes (GB = 10^9, GiB = 2^30)."""
    s = str(text).strip().replace(" ", "")
    units = {"gib": 2**30, "gb": 10**9, "mib": 2**20, "mb": 10**6, "tb": 10**12, "b": 1}
    for u, f in units.items():
        if s.lower().endswith(u):
            return int(float(s[: -len(u)]) * f)
    return int(float(s))


def markdown(result: dict, title: str) -> list[str]:
    """The plan as a table: step, program, held, total, fits."""
    limit = result["device_memory"]
    lines = [
        f"| step ({title}) | program | held outside | per device | fits |",
        "|---|---:|---:|---:|---|",
    ]
    for name, total in result["steps"].items():
        d = result["detail"][name]
        ok = "-" if limit is None else ("yes" if total <= limit else "**no**")
        lines.append(
            f"| {name}: {d['note']} | {d['program'] / GB:.1f} GB | {d['held'] / GB:.1f} GB | "
            f"{total / GB:.1f} GB | {ok} |"
        )
    return lines
