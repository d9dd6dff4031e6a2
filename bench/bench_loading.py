"""Peak host RSS and seconds of loading a generated multi-file checkpoint onto 8 CPU devices.

  python -m bench.bench_loading                         # fsdp=8, sharded vs old loader, 3 runs
  python -m bench.bench_loading --mesh=tensor=8 --runs=3 --out=/tmp/loading.json

A random Qwen3-shaped checkpoint (default 36 layers, d 1024, f 3072, vocab
49152, untied: 554M parameters, 1.1 GB of bf16 in 256 MB safetensors files) is
written to a temporary directory (or --ckpt_dir, reused when it exists). Each
run is a fresh process with 8 fake CPU devices that loads it as float32 onto
the mesh and then does what the trainer does (`sharding.shard` onto the weight
shardings), so its peak RSS (ru_maxrss) is the loader's alone:

- `sharded`: `load_model(dir, mesh=mesh)` of this tree (each device's block
  read by slice, converted per slice, placed straight into its NamedSharding).
- `old`: the loader before sharded loading (commit --old_commit, exported with
  `git archive` to a temp dir): read every tensor, convert, commit the whole
  model to device 0, then reshard while the device-0 copy is still referenced.

All 8 devices live in this one process, so the per-host share is the whole
model in float32. Target: peak RSS increase over the RSS just before loading
<= 1.3 x share + one tensor.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from absl import app, flags

flags.DEFINE_string("ckpt_dir", "", "Checkpoint directory (generated into a temp dir if empty; "
                    "generated there and kept if it does not exist).")
flags.DEFINE_integer("layers", 36, "Decoder layers of the generated checkpoint.")
flags.DEFINE_integer("hidden", 1024, "Hidden size.")
flags.DEFINE_integer("ffn", 3072, "MLP intermediate size.")
flags.DEFINE_integer("heads", 16, "Query heads (head_dim 64).")
flags.DEFINE_integer("kv_heads", 8, "Key/value heads.")
flags.DEFINE_integer("vocab", 49152, "Vocabulary (the embedded SmolLM2 tokenizer's size).")
flags.DEFINE_string("store_dtype", "bfloat16", "dtype of the tensors in the files.")
flags.DEFINE_string("dtype", "float32", "Parameter dtype loaded (converted per slice).")
flags.DEFINE_integer("file_mb", 256, "Max safetensors file size (MB).")
flags.DEFINE_string("mesh", "fsdp=8", "Mesh axes, e.g. fsdp=8 or tensor=8 or fsdp=2,tensor=4.")
flags.DEFINE_integer("runs", 3, "Runs per loader (each a fresh process).")
flags.DEFINE_string("loaders", "sharded,old", "Comma list: sharded, old.")
flags.DEFINE_string("old_commit", "af08a7c", "Commit whose loader is `old` (the last one before "
                    "sharded loading).")
flags.DEFINE_integer("wait_minutes", 20, "How long a run waits for enough free memory.")
flags.DEFINE_string("out", "", "Write all runs and the summary as JSON here.")
flags.DEFINE_string("worker", "", "Internal: sharded | old (one measured load).")
flags.DEFINE_string("tree", "", "Internal: source tree the old worker imports.")
FLAGS = flags.FLAGS

HEAD_DIM = 64


def _maxrss_bytes() -> int:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _rss_bytes() -> int:
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _mesh_axes(spec: str) -> dict[str, int]:
  axes = {"data": 1, "fsdp": 1, "tensor": 1}
  for part in filter(None, spec.split(",")):
    name, size = part.split("=")
    if name not in axes:
      raise ValueError(f"--mesh: unknown axis {name!r}; use data, fsdp, tensor")
    axes[name] = int(size)
  return axes


def write_checkpoint(path: str) -> dict:
  """A random Qwen3-shaped HF directory (config, safetensors files + index, tokenizer)."""
  import ml_dtypes
  import numpy as np
  from safetensors.numpy import save_file

  from diffmas_jax.config import ModelConfig
  from diffmas_jax.io.gguf import default_gguf_path, load_gguf_tokenizer
  from diffmas_jax.io.safetensors_io import INDEX

  cfg = ModelConfig(family="qwen3", vocab_size=FLAGS.vocab, hidden_size=FLAGS.hidden,
                    num_layers=FLAGS.layers, num_heads=FLAGS.heads, num_kv_heads=FLAGS.kv_heads,
                    head_dim=HEAD_DIM, intermediate_size=FLAGS.ffn, dtype=FLAGS.store_dtype)
  d, f, q, kv = FLAGS.hidden, FLAGS.ffn, FLAGS.heads * HEAD_DIM, FLAGS.kv_heads * HEAD_DIM
  shapes = {"model.embed_tokens.weight": (FLAGS.vocab, d)}
  for i in range(FLAGS.layers):
    p = f"model.layers.{i}."
    shapes.update({p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,),
                   p + "self_attn.q_proj.weight": (q, d), p + "self_attn.k_proj.weight": (kv, d),
                   p + "self_attn.v_proj.weight": (kv, d), p + "self_attn.o_proj.weight": (d, q),
                   p + "self_attn.q_norm.weight": (HEAD_DIM,),
                   p + "self_attn.k_norm.weight": (HEAD_DIM,),
                   p + "mlp.gate_proj.weight": (f, d), p + "mlp.up_proj.weight": (f, d),
                   p + "mlp.down_proj.weight": (d, f)})
  shapes.update({"model.norm.weight": (d,), "lm_head.weight": (FLAGS.vocab, d)})
  os.makedirs(path, exist_ok=True)
  rng = np.random.default_rng(0)
  store = np.dtype(ml_dtypes.bfloat16 if FLAGS.store_dtype == "bfloat16" else FLAGS.store_dtype)
  weight_map, shard, size, files, total = {}, {}, 0, [], 0

  def flush():
    name = f"model-{len(files) + 1:05d}.safetensors"
    save_file(shard, os.path.join(path, name), metadata={"format": "pt"})
    weight_map.update({k: name for k in shard})
    files.append(name)

  for name, shape in shapes.items():
    w = (1.0 + 0.1 * rng.standard_normal(shape, np.float32) if len(shape) == 1 else
         0.02 * rng.standard_normal(shape, np.float32)).astype(store)
    if shard and size + w.nbytes > FLAGS.file_mb * 2**20:
      flush()
      shard, size = {}, 0
    shard[name], size, total = w, size + w.nbytes, total + w.nbytes
  flush()
  with open(os.path.join(path, INDEX), "w") as fh:
    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, fh)
  with open(os.path.join(path, "config.json"), "w") as fh:
    json.dump(cfg.to_hf(), fh, indent=2)
  load_gguf_tokenizer(default_gguf_path()).save_pretrained(path)
  params = sum(int(np.prod(s)) for s in shapes.values())
  return {"files": len(files), "bytes": total, "params": params,
          "largest_tensor_params": max(int(np.prod(s)) for s in shapes.values())}


def worker(kind: str) -> dict:
  """One load in this fresh process; returns its seconds and peak RSS."""
  if kind == "old":
    sys.path.insert(0, FLAGS.tree)  # the old diffmas_jax shadows this tree's
  import jax
  jax.config.update("jax_num_cpu_devices", 8)
  import numpy as np

  from diffmas_jax import sharding
  from diffmas_jax.loading import load_model

  mesh = sharding.make_mesh(**_mesh_axes(FLAGS.mesh))
  assert os.path.dirname(sharding.__file__).startswith(FLAGS.tree or os.getcwd()), sharding.__file__
  before = _rss_bytes()  # now, not the import-time peak
  t0 = time.perf_counter()
  if kind == "sharded":
    m = load_model(FLAGS.ckpt_dir, dtype=FLAGS.dtype, mesh=mesh)
  else:
    m = load_model(FLAGS.ckpt_dir, dtype=FLAGS.dtype)
  # What the trainer does next (the old loader's device-0 copy is still referenced by `m`).
  weights = sharding.shard(m.weights, sharding.weight_shardings(m.cfg, mesh))
  jax.block_until_ready(weights)
  seconds = time.perf_counter() - t0
  peak = _maxrss_bytes()
  leaves = jax.tree.leaves(weights)
  share = sum(s.data.nbytes for x in leaves for s in x.addressable_shards)
  # Checksum over the blocks, one at a time (after the peak was taken).
  checksum = float(sum(np.asarray(s.data, np.float64).sum() for x in leaves
                       for s in x.addressable_shards if s.replica_id == 0))
  return {"loader": kind, "seconds": seconds, "rss_before_gb": before / 1e9,
          "rss_peak_gb": peak / 1e9, "rss_increase_gb": (peak - before) / 1e9,
          "host_share_gb": share / 1e9, "checksum": checksum,
          "largest_leaf_gb": max(x.nbytes for x in leaves) / 1e9}


def _export_old_tree(commit: str, into: str) -> str:
  os.makedirs(into, exist_ok=True)
  archive = subprocess.run(["git", "archive", commit, "diffmas_jax"], check=True,
                           capture_output=True).stdout
  subprocess.run(["tar", "-x", "-C", into], input=archive, check=True)
  return into


def _available_bytes() -> int:
  with open("/proc/meminfo") as f:
    fields = dict(line.split(":", 1) for line in f)
  return int(fields["MemAvailable"].split()[0]) * 1024


def _wait_for_memory(need: float, kind: str) -> None:
  """Waits (up to --wait_minutes) until `need` bytes are free: a shared host must not OOM."""
  deadline = time.time() + 60 * FLAGS.wait_minutes
  while _available_bytes() < need:
    if time.time() > deadline:
      raise RuntimeError(f"{kind} run needs about {need / 1e9:.1f} GB but only "
                         f"{_available_bytes() / 1e9:.1f} GB are available; free memory or "
                         "use a smaller checkpoint (--layers).")
    time.sleep(20)


def _stored_and_share_bytes() -> tuple[int, float]:
  """Bytes in the files, and once loaded in --dtype (all 8 devices are local)."""
  files = [f for f in os.listdir(FLAGS.ckpt_dir) if f.endswith(".safetensors")]
  stored = sum(os.path.getsize(os.path.join(FLAGS.ckpt_dir, f)) for f in files)
  size = {"float32": 4, "bfloat16": 2}
  return stored, stored * size[FLAGS.dtype] / size[FLAGS.store_dtype]


def _run_worker(kind: str, tree: str) -> dict:
  # Peaks measured: sharded about 1.1-1.2 x share; old the stored bytes + about 2 x share.
  stored, share = _stored_and_share_bytes()
  _wait_for_memory((1.4 * share if kind == "sharded" else stored + 2.4 * share) + 0.5e9, kind)
  args = [sys.executable, "-m", "bench.bench_loading", f"--worker={kind}", f"--tree={tree}",
          f"--ckpt_dir={FLAGS.ckpt_dir}", f"--mesh={FLAGS.mesh}", f"--dtype={FLAGS.dtype}"]
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
  proc = subprocess.run(args, capture_output=True, text=True, env=env)
  if proc.returncode:
    raise RuntimeError(f"{kind} worker failed:\n{proc.stderr[-3000:]}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


def _stats(values: list[float]) -> str:
  return f"{min(values):.2f} / {statistics.median(values):.2f} / {max(values):.2f}"


def main(argv):
  del argv
  if FLAGS.worker:
    print(json.dumps(worker(FLAGS.worker)))
    return
  tmp = tempfile.mkdtemp(prefix="bench_loading.")
  try:
    if not FLAGS.ckpt_dir:
      FLAGS.ckpt_dir = os.path.join(tmp, "ckpt")
    info = None
    if not os.path.exists(FLAGS.ckpt_dir):
      t0 = time.perf_counter()
      info = write_checkpoint(FLAGS.ckpt_dir)
      print(f"wrote {info['params'] / 1e6:.0f}M parameters, {info['bytes'] / 1e9:.2f} GB of "
            f"{FLAGS.store_dtype} in {info['files']} files to {FLAGS.ckpt_dir} "
            f"({time.perf_counter() - t0:.0f} s)")
    old_tree = _export_old_tree(FLAGS.old_commit, os.path.join(tmp, "old"))
    loaders = [x for x in FLAGS.loaders.split(",") if x]
    runs = []
    for i in range(FLAGS.runs):  # interleaved, so load drift on the host hits both alike
      for kind in loaders:
        r = _run_worker(kind, old_tree if kind == "old" else "")
        runs.append(r)
        print(f"run {i + 1} {kind:8s} {r['seconds']:6.1f} s  peak RSS {r['rss_peak_gb']:.2f} GB "
              f"(+{r['rss_increase_gb']:.2f} over {r['rss_before_gb']:.2f} before loading)",
              flush=True)
    share = runs[0]["host_share_gb"]
    largest = runs[0]["largest_leaf_gb"]
    print(f"\nmesh {FLAGS.mesh} on 8 CPU devices, {FLAGS.store_dtype} files -> {FLAGS.dtype}; "
          f"per-host share {share:.2f} GB, largest leaf {largest:.2f} GB; load "
          f"{os.getloadavg()[0]:.1f}")
    print("| loader | seconds min/med/max | peak RSS GB min/med/max | RSS increase GB "
          "min/med/max | increase / share |")
    print("|---|---|---|---|---|")
    summary = {}
    for kind in loaders:
      mine = [r for r in runs if r["loader"] == kind]
      inc = [r["rss_increase_gb"] for r in mine]
      summary[kind] = {k: [r[k] for r in mine] for k in ("seconds", "rss_peak_gb",
                                                          "rss_increase_gb")}
      print(f"| {kind} | {_stats([r['seconds'] for r in mine])} | "
            f"{_stats([r['rss_peak_gb'] for r in mine])} | {_stats(inc)} | "
            f"{statistics.median(inc) / share:.2f}x |")
    sums = {round(r["checksum"], 3) for r in runs}
    print(f"checksums equal across loaders: {len(sums) == 1}")
    if FLAGS.out:
      with open(FLAGS.out, "w") as fh:
        json.dump({"mesh": FLAGS.mesh, "checkpoint": info, "share_gb": share,
                   "largest_leaf_gb": largest, "runs": runs, "summary": summary}, fh, indent=2)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
  app.run(main)
