"""The latent pipeline written plainly in transformers (PyTorch): the benchmarks' reference.

No batching, no padding, no compilation: each agent's prompt is prefilled with
`past_key_values`, then m realigned `inputs_embeds` steps follow, as SPEC
section 1 describes. Gradients flow through it when autograd is on.
"""

from __future__ import annotations


def realigner(model, lam: float = 1e-5):
  """(W_a, target norm) of the ridge realignment, in f32, without gradients."""
  import torch
  with torch.no_grad():
    w_in = model.get_input_embeddings().weight.float()
    w_out = model.get_output_embeddings().weight.float()
    w_a = torch.linalg.solve(w_out.T @ w_out + lam * torch.eye(w_in.shape[1]), w_out.T @ w_in)
    return w_a, w_in.norm(dim=-1).mean()


def build_trace(model, agent_ids: list[list[int]], steps: int, w_a, target_norm):
  """past_key_values after every agent's prompt and `steps` latent thoughts."""
  import torch
  past = None
  for ids in agent_ids:
    out = model(input_ids=torch.tensor([ids]), past_key_values=past, use_cache=True,
                output_hidden_states=True)
    past, h = out.past_key_values, out.hidden_states[-1][:, -1]
    for _ in range(steps):
      e = h @ w_a
      e = e * (target_norm / e.norm(dim=-1, keepdim=True).clamp_min(1e-6))
      out = model(inputs_embeds=e[:, None], past_key_values=past, use_cache=True,
                  output_hidden_states=True)
      past, h = out.past_key_values, out.hidden_states[-1][:, -1]
  return past
