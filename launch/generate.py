"""Chat with a model from the command line (greedy by default).

  python -m launch.generate --prompt="What is the capital of France?"
  python -m launch.generate --source=/path/to/Qwen3-8B --temperature=0.6 --top_p=0.95 --prompt=...
"""

import time

from absl import flags

from launch import cli

flags.DEFINE_string("source", "embedded:smollm2-135m-instruct", "Model source (see loading.py).")
flags.DEFINE_multi_string("prompt", ["What is the capital of France?"], "User message(s); one batch row each.")
flags.DEFINE_integer("max_new_tokens", 64, "Tokens to generate per prompt.")
flags.DEFINE_float("temperature", 0.0, "0 = greedy.")
flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass.")
flags.DEFINE_integer("top_k", 0, "Top-k sampling (0 = off).")
flags.DEFINE_integer("seed", 0, "Sampling seed.")
flags.DEFINE_string("dtype", "float32", "float32 | bfloat16")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  from diffmas_jax import sampling
  from diffmas_jax.config import DTYPES
  from diffmas_jax.loading import check_source, load_model
  from diffmas_jax.model import inference_layout

  cli.check_all(lambda: check_source(FLAGS.source), _check_flags(DTYPES))
  t0 = time.time()
  m = load_model(FLAGS.source, dtype=FLAGS.dtype)
  # Inference layout for this batch, built once (model.inference_layout).
  m.weights = inference_layout(m.weights, len(FLAGS.prompt))
  print(f"loaded {FLAGS.source} ({m.cfg.family}, {m.cfg.num_layers} layers) in {time.time() - t0:.1f}s")
  prompts = [m.tokenizer.encode_chat([{"role": "user", "content": p}]) for p in FLAGS.prompt]
  sc = sampling.SamplingConfig(max_new_tokens=FLAGS.max_new_tokens, temperature=FLAGS.temperature,
                               top_p=FLAGS.top_p, top_k=FLAGS.top_k,
                               stop_ids=tuple(m.tokenizer.stop_ids), pad_id=m.tokenizer.pad_id)
  print("generating (the first call compiles unless the compile cache has it) ...", flush=True)
  t0 = time.time()
  outs = sampling.generate(m.weights, m.cfg, prompts, sc, seed=FLAGS.seed)
  dt = time.time() - t0
  for prompt, ids in zip(FLAGS.prompt, outs):
    print(f"\n>>> {prompt}\n{m.tokenizer.decode(ids)}")
  n = sum(len(o) for o in outs)
  print(f"\n{n} tokens in {dt:.1f}s (first call includes compilation)")


def _check_flags(dtypes):
  def check():
    cli.check_value(FLAGS.max_new_tokens >= 1, f"--max_new_tokens={FLAGS.max_new_tokens}: "
                    "must be >= 1")
    cli.check_value(FLAGS.temperature >= 0, f"--temperature={FLAGS.temperature}: must be >= 0 "
                    "(0 = greedy)")
    cli.check_value(0 < FLAGS.top_p <= 1, f"--top_p={FLAGS.top_p}: must be in (0, 1]")
    cli.check_value(FLAGS.top_k >= 0, f"--top_k={FLAGS.top_k}: must be >= 0 (0 = off)")
    cli.check_value(FLAGS.dtype in dtypes, f"--dtype={FLAGS.dtype}: choose one of {dtypes}")
  return check


if __name__ == "__main__":
  cli.run(main)
