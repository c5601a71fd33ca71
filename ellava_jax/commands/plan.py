"""`ellava plan`: per-step device memory of a search recipe, from compiled programs."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

NAME = "plan"
HELP = (
    "Compile every step of a search recipe with abstract arrays (nothing allocated, no weights "
    "or data read) and print each step's per-device peak, the host memory and whether it fits."
)


def add_arguments(p):
    p.add_argument("--config", required=True, help="search recipe (a YAML path or a shipped name)")
    p.add_argument(
        "--model",
        default=None,
        help="the model's config to plan for: a preset (llava-1.5-7b, llava-1.5-13b, tiny, "
        "tiny-llama), toy, smollm2 or an HF directory (its config.json only); default: the "
        "recipe's model, or the preset its directory is named after when it does not exist",
    )
    p.add_argument(
        "--device-memory", default=None, help="the device's memory, e.g. 80GB or 16GiB (fits?)"
    )
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    p.add_argument(
        "--image-tokens", type=int, default=576, help="image tokens per multimodal sample"
    )
    p.add_argument("--text-tokens", type=int, default=64, help="text tokens per multimodal sample")
    p.add_argument(
        "--mesh",
        default=None,
        help="--set mesh=MESH: plan per device of a mesh, e.g. data=2,model=4 (on a CPU with "
        "fewer devices, the plan compiles on that many forced host devices)",
    )
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override")
    p.add_argument("--json", action="store_true", help="print the plan as JSON (last line)")


def model_config(spec: str, explicit: bool):
    """(config, what it was read from) without reading weights."""
    from ellava_jax.app.models import NAMED, load_config
    from ellava_jax.config import PRESETS, get_preset
    from ellava_jax.errors import UserError

    if spec in PRESETS:
        return get_preset(spec), f"preset {spec}"
    if spec in NAMED or os.path.isdir(spec):
        return load_config(spec), spec
    base = os.path.basename(os.path.normpath(spec))
    guess = [p for p in PRESETS if base.startswith(p)]
    if not explicit and guess:
        return get_preset(guess[0]), f"preset {guess[0]} ({spec} does not exist here)"
    raise UserError(
        f"{spec}: no such model directory; pass --model PRESET ({', '.join(PRESETS)}) or a "
        "directory with a config.json"
    )


def _forced_devices(args, need: int) -> int | None:
    """On a CPU backend with fewer devices than the mesh needs, the same command in a process
    with `need` forced host devices (XLA's device count is fixed when the backend starts);
    its output printed here. None when this process has the devices."""
    import jax

    if len(jax.devices()) >= need or jax.default_backend() != "cpu":
        return None
    if os.environ.get("ELLAVA_PLAN_FORCED"):
        return None  # already the forced process: make_mesh names the shortfall
    flags = os.environ.get("XLA_FLAGS", "")
    env = dict(
        os.environ,
        XLA_FLAGS=f"{flags} --xla_force_host_platform_device_count={need}".strip(),
        ELLAVA_PLAN_FORCED="1",
        JAX_PLATFORMS="cpu",
    )
    out = subprocess.run(
        [sys.executable, "-m", "ellava_jax.cli", "plan", *args.argv],
        env=env,
        capture_output=True,
        text=True,
    )
    print(out.stdout, end="")
    print(out.stderr, end="", file=sys.stderr)
    return out.returncode


def run(args) -> int:
    from ellava_jax.plan import GB, markdown, parse_bytes, plan
    from ellava_jax.search.settings import command_line_overrides, load_settings

    overrides, origins = command_line_overrides(args.set, {"mesh": args.mesh})
    settings = load_settings(args.config, overrides, origins=origins)
    mesh = None
    if settings.mesh is not None:
        from ellava_jax.mesh import make_mesh, parse_mesh

        need = math.prod(parse_mesh(settings.mesh).values())
        forced = _forced_devices(args, need)
        if forced is not None:
            return forced
        mesh = make_mesh(settings.mesh, __import__("jax").devices()[:need])
    spec = args.model or settings.model
    config, source = model_config(spec, explicit=args.model is not None)
    limit = None if args.device_memory is None else parse_bytes(args.device_memory)
    result = plan(
        settings,
        config,
        dtype=args.dtype,
        device_memory=limit,
        image_tokens=args.image_tokens,
        text_tokens=args.text_tokens,
        mesh=mesh,
    )
    result |= {"recipe": args.config, "model": source}
    where = result["backend"]
    if mesh is not None:
        shown = ",".join(f"{a}={n}" for a, n in mesh.shape.items())
        where += f", per device of mesh {shown} ({mesh.size} devices)"
    print(f"plan for {args.config} on {source}, {args.dtype}, compiled for {where}")
    print("\n".join(markdown(result, source)))
    h = result["host_bytes"]
    print(
        f"host: level database {h['level_database'] / GB:.1f} GB, KL targets "
        f"{h['kl_targets'] / GB:.1f} GB, projector layer inputs "
        f"{h['projector_layer_inputs'] / GB:.1f} GB, parameters {h['parameters'] / GB:.1f} GB; "
        f"host-to-device per round {result['h2d_bytes_per_round'] / GB:.1f} GB"
    )
    if limit is not None:
        print(
            f"fits in {limit / GB:.1f} GB: {'yes' if result['fits'] else 'no'}"
            + ("" if result["fits"] else " (see docs/user-guide.md: settings for a smaller device)")
        )
    if args.json:
        print(json.dumps(result))
    return 0
