"""Device mesh and logical-axis sharding rules.

Every weight and cache leaf names its axes logically (batch, length, embed,
heads, kv_heads, head_dim, mlp, vocab, layers); a rules table maps those names
onto mesh axes (data, fsdp, tensor). The same code then runs on one CPU, a GPU
box or a TPU pod by changing only the mesh shape.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from diffmas_jax.config import ModelConfig
from diffmas_jax.kv_cache import CACHE_AXES, KVCache
from diffmas_jax.params import ParamSpec, is_spec, weight_specs

MESH_AXES = ("data", "fsdp", "tensor")
PARALLELISM = ("auto", "data", "tensor", "fsdp", "manual")

# A flax / MaxText-style rules table: (logical axis, mesh axis | tuple | None) pairs
# in priority order. Each array dimension takes the first rule whose mesh axes no
# earlier dimension of the same array uses; a later pair is a fallback. A dict
# {logical: mesh} is accepted too (one option per name, as before).
#   vocab first: the LM head and the logits are split over every model axis, so
#     the loss runs on vocab shards and the head is never gathered (see
#     train.sharded_cross_entropy); in the [V, D] / [D, V] tables `embed` then
#     falls back to None.
#   batch over (data, fsdp); in the logits, where vocab took fsdp, over data.
#   heads, kv_heads, mlp over tensor: Megatron-style, inside a host.
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("vocab", ("tensor", "fsdp")),
    ("vocab", "tensor"),
    ("batch", ("data", "fsdp")),
    ("batch", "data"),
    ("embed", "fsdp"),
    ("embed", None),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("head_dim", None),
    ("layers", None),
    ("length", None),
    ("rank", None),
    ("agents", None),
)


def rule_pairs(rules: Mapping | Sequence) -> tuple[tuple[str, Any], ...]:
  """A rules dict or sequence of pairs as a hashable tuple of pairs (flax's format)."""
  items = rules.items() if isinstance(rules, Mapping) else rules
  return tuple((str(k), tuple(v) if isinstance(v, list) else v) for k, v in items)


class ShardingError(ValueError):
  """An impossible mesh, a rule collision, or a dimension the mesh cannot split."""


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Builds a (data, fsdp, tensor) mesh; one size may be -1 (= the remaining devices)."""
  devices = list(devices if devices is not None else jax.devices())
  sizes = {"data": data, "fsdp": fsdp, "tensor": tensor}
  free = [k for k, v in sizes.items() if v == -1]
  if len(free) > 1:
    raise ShardingError(f"at most one mesh axis may be -1, got {sizes}")
  if any(v == 0 or v < -1 for v in sizes.values()):
    raise ShardingError(f"mesh axis sizes must be positive (or one -1), got {sizes}")
  fixed = math.prod(v for v in sizes.values() if v != -1)
  if free:
    if len(devices) % fixed:
      raise ShardingError(f"mesh {sizes}: {len(devices)} devices are not divisible by {fixed}; "
                          "choose axis sizes whose product divides the device count.")
    sizes[free[0]] = len(devices) // fixed
  if math.prod(sizes.values()) != len(devices):
    raise ShardingError(
        f"mesh {sizes} needs {math.prod(sizes.values())} devices but {len(devices)} are "
        f"available ({jax.default_backend()}); set --config.mesh.* so the product matches, "
        "or use -1 for one axis.")
  grid = np.asarray(devices).reshape(sizes["data"], sizes["fsdp"], sizes["tensor"])
  return Mesh(grid, MESH_AXES)


def weight_bytes(cfg: ModelConfig) -> int:
  """Bytes of the base weights in their dtype."""
  specs = jax.tree.leaves(weight_specs(cfg), is_leaf=is_spec)
  return sum(math.prod(p.shape) for p in specs) * np.dtype(cfg.dtype).itemsize


def device_memory_bytes(device: jax.Device | None = None) -> int | None:
  """The accelerator's memory limit, or None where JAX does not report one (CPU)."""
  device = device or jax.devices()[0]
  try:
    stats = device.memory_stats() or {}
  except Exception:  # noqa: BLE001  backends without memory stats
    return None
  return stats.get("bytes_limit")


def tensor_size(cfg: ModelConfig, n: int, local_devices: int) -> int:
  """Largest tensor-parallel size inside one host that divides n and every split dim."""
  dims = (cfg.num_heads, cfg.num_kv_heads, cfg.intermediate_size, cfg.vocab_size)
  return max(t for t in range(1, min(n, local_devices) + 1)
             if n % t == 0 and all(d % t == 0 for d in dims))


def choose_mesh(cfg: ModelConfig, n: int, parallelism: str, device_bytes: int | None = None,
                local_devices: int | None = None, weight_fraction: float = 0.5
                ) -> dict[str, int]:
  """Mesh sizes for a parallelism mode (LoRA-through-the-trace: frozen base weights).

  data    replicated base weights, batch split n ways: no weight traffic at all.
  tensor  heads / kv_heads / mlp / vocab split inside a host; data across hosts.
          Weights stay resident: latent steps move only [B, 1, D] activations.
  fsdp    tensor inside a host, embed dims split over fsdp across hosts: each
          layer's weights are gathered where used (every latent step too).
  auto    the first of data, tensor (smallest size), fsdp (smallest size) whose
          weights take at most `weight_fraction` of `device_bytes`; data when
          the device memory is unknown (CPU).
  """
  if parallelism not in PARALLELISM or parallelism == "manual":
    raise ShardingError(f"mesh.parallelism={parallelism!r}; choose one of {PARALLELISM[:-1]} "
                        "or 'manual' with explicit --config.mesh.data/fsdp/tensor")
  local = local_devices or max(1, min(n, jax.local_device_count()))
  t_max = tensor_size(cfg, n, local)
  if parallelism == "data":
    return dict(data=n, fsdp=1, tensor=1)
  if parallelism == "tensor":
    return dict(data=n // t_max, fsdp=1, tensor=t_max)
  if parallelism == "fsdp":
    return dict(data=1, fsdp=n // t_max, tensor=t_max)
  budget = None if device_bytes is None else weight_fraction * device_bytes
  w = weight_bytes(cfg)
  if budget is None or w <= budget:
    return dict(data=n, fsdp=1, tensor=1)
  for t in range(2, t_max + 1):
    if t_max % t == 0 and w / t <= budget:
      return dict(data=n // t, fsdp=1, tensor=t)
  rest = n // t_max
  for f in range(2, rest + 1):
    if rest % f == 0 and w / (t_max * f) <= budget:
      return dict(data=rest // f, fsdp=f, tensor=t_max)
  raise ShardingError(f"{w / 2**30:.1f} GiB of weights do not fit {n} devices of "
                      f"{device_bytes / 2**30:.1f} GiB even fully sharded; use more devices "
                      "or a smaller model")


def resolve_mesh_sizes(mesh_cfg: Any, cfg: ModelConfig | None, n: int | None = None,
                       device_bytes: int | None = None) -> dict[str, int]:
  """Mesh sizes from the config's mesh section ({data, fsdp, tensor, parallelism}).

  `manual`, or `auto` with any size changed from the defaults (-1, 1, 1), uses
  the sizes as given; the other modes derive them (see `choose_mesh`).
  """
  sizes = dict(data=int(mesh_cfg.data), fsdp=int(mesh_cfg.fsdp), tensor=int(mesh_cfg.tensor))
  mode = mesh_cfg.get("parallelism", "manual")
  if mode == "manual" or (mode == "auto" and sizes != dict(data=-1, fsdp=1, tensor=1)):
    return sizes
  if mode != "auto" and sizes != dict(data=-1, fsdp=1, tensor=1):
    raise ShardingError(f"mesh.parallelism={mode!r} chooses the mesh sizes, but sizes {sizes} "
                        "were set; set --config.mesh.parallelism=manual to use them")
  if cfg is None:
    if mode == "auto":
      return sizes
    raise ShardingError(f"mesh.parallelism={mode!r} needs the model's shapes")
  n = n or jax.device_count()
  if mode == "auto" and device_bytes is None:
    device_bytes = device_memory_bytes()
  return choose_mesh(cfg, n, mode, device_bytes)


def _mesh_axes(target) -> tuple[str, ...]:
  return (target,) if isinstance(target, str) else tuple(target or ())


def logical_to_spec(axes: Sequence[str | None], rules: Mapping | Sequence = DEFAULT_RULES) -> P:
  """Maps logical axis names to a PartitionSpec with flax's priority rules.

  Raises ShardingError for a name without any rule, and for a collision: a
  name none of whose rules is free (its mesh axes already used by another
  dimension of the array) and which has no `None` fallback.
  """
  pairs = rule_pairs(rules)
  known = {k for k, _ in pairs}
  for name in axes:
    if name is not None and name not in known:
      raise ShardingError(f"no sharding rule for logical axis {name!r}; add it to the rules "
                          f"(known: {sorted(known)})")
  spec = nn.logical_to_mesh_axes(tuple(axes), pairs)
  for name, got in zip(axes, spec):
    options = [m for k, m in pairs if k == name]
    if name is None or got is not None or None in options:
      continue
    owner = {a: other for other, g in zip(axes, spec) for a in _mesh_axes(g)}
    taken = sorted({a for m in options for a in _mesh_axes(m) if a in owner})
    raise ShardingError(f"rule collision: logical axes {owner[taken[0]]!r} and {name!r} both map "
                        f"to mesh axis {taken[0]!r} in one array {tuple(axes)}; change the rules.")
  return P(*[m[0] if isinstance(m, tuple) and len(m) == 1 else m for m in spec])


def named_sharding(mesh: Mesh, axes: Sequence[str | None], shape: Sequence[int] | None = None,
                   rules: Mapping | Sequence = DEFAULT_RULES) -> NamedSharding:
  """NamedSharding for an array with these logical axes, checking divisibility."""
  spec = logical_to_spec(axes, rules)
  if shape is not None:
    for dim, name, part in zip(shape, axes, spec):
      parts = (part,) if isinstance(part, str) else tuple(part or ())
      n = math.prod(mesh.shape[p] for p in parts)
      if dim % n:
        raise ShardingError(
            f"dimension {name}={dim} cannot be split over mesh axes {parts} of total size {n}; "
            "use a mesh whose size divides it or map this axis to None in the rules.")
  return NamedSharding(mesh, spec)


def weight_shardings(cfg: ModelConfig, mesh: Mesh, rules: Mapping | Sequence = DEFAULT_RULES):
  """A Weights-shaped tree of NamedShardings, from the single weight declaration."""
  return jax.tree.map(lambda s: named_sharding(mesh, s.axes, s.shape, rules),
                      weight_specs(cfg), is_leaf=is_spec)


def cache_shardings(cache: KVCache, mesh: Mesh, rules: Mapping | Sequence = DEFAULT_RULES) -> KVCache:
  return KVCache(**{name: named_sharding(mesh, CACHE_AXES[name], getattr(cache, name).shape, rules)
                    for name in ("k", "v", "pos", "end")})


def batch_shards(mesh: Mesh, rules: Mapping | Sequence = DEFAULT_RULES) -> tuple[int, str]:
  """(devices the logical batch axis is split over, their mesh axes as text)."""
  axes = _mesh_axes(logical_to_spec(("batch",), rules)[0])
  return math.prod(mesh.shape[a] for a in axes), " x ".join(axes) or "no mesh axis"


def batch_shardings(mesh: Mesh, batch, rules: Mapping | Sequence = DEFAULT_RULES):
  """Shardings of a pipeline batch: [B, T] leaves split on axis 0, the agents'
  [A, B, T] leaves on axis 1 (checked to divide)."""
  def one(x):
    axes = ("batch", None) if x.ndim == 2 else (None, "batch", None)
    return named_sharding(mesh, axes, x.shape, rules)
  return jax.tree.map(one, batch)


def empty_cache(cfg: ModelConfig, batch: int, capacity: int, mesh: Mesh | None = None,
                dtype=None, rules: Mapping | Sequence = DEFAULT_RULES) -> KVCache:
  """`KVCache.init` created straight in its shardings on `mesh` (rows over the batch
  axes, no whole copy on any one device); None: on the default device."""
  if mesh is None:
    return KVCache.init(cfg, batch, capacity, dtype)
  shapes = jax.eval_shape(lambda: KVCache.init(cfg, batch, capacity, dtype))
  return KVCache.init(cfg, batch, capacity, dtype, shardings=cache_shardings(shapes, mesh, rules))


def shard(tree, shardings):
  """device_put a pytree onto matching shardings."""
  return jax.tree.map(jax.device_put, tree, shardings)


def constrain(x: jax.Array, mesh: Mesh | None, *axes: str | None,
              rules: Mapping | Sequence = DEFAULT_RULES) -> jax.Array:
  """with_sharding_constraint by logical names; identity without a mesh."""
  if mesh is None:
    return x
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(axes, rules)))


def spec_of(param: ParamSpec, rules: Mapping | Sequence = DEFAULT_RULES) -> P:
  return logical_to_spec(param.axes, rules)
