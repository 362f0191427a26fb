"""DPO in a plain PyTorch loop with `dpo_fast.linear_dpo_loss` (no trainer framework).

The policy's backbone gives the last hidden states; the loss fuses the lm_head, so the
[tokens, vocab] logits are never built. Runs offline on a tiny random Llama:

    python examples/plain_loop.py --steps 20

With a real model, replace `tiny_model()` by `AutoModelForCausalLM.from_pretrained(...)` and the random
batch by your tokenized pairs (rows [:B] chosen, [B:] rejected, labels aligned with the outputs).
"""

import argparse
import copy

import torch
import transformers

import dpo_fast


def tiny_model(vocab_size: int = 64) -> transformers.LlamaForCausalLM:
    config = transformers.LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    return transformers.LlamaForCausalLM(config)


def random_pairs(num_pairs: int, prompt_len: int, completion_len: int, vocab_size: int, generator):
    """input_ids [2B, L] = prompt + completion (chosen rows first), labels aligned: position t scores t+1."""
    prompts = torch.randint(0, vocab_size, (num_pairs, prompt_len), generator=generator).repeat(2, 1)
    completions = torch.randint(0, vocab_size, (2 * num_pairs, completion_len), generator=generator)
    input_ids = torch.cat([prompts, completions], dim=1)
    labels = torch.full_like(input_ids, -100)
    labels[:, prompt_len - 1:-1] = completions  # the last prompt position predicts the first completion token
    return input_ids, labels


def main(argv=None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--lr", type=float, default=1e-3)
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    policy = tiny_model()
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=args.lr)
    generator = torch.Generator().manual_seed(0)
    input_ids, labels = random_pairs(args.pairs, 6, 5, policy.config.vocab_size, generator)

    for step in range(args.steps):
        hidden = policy.model(input_ids=input_ids).last_hidden_state
        with torch.no_grad():
            ref_hidden = reference.model(input_ids=input_ids).last_hidden_state
        out = dpo_fast.linear_dpo_loss(hidden, policy.lm_head.weight, labels, ref_hidden=ref_hidden,
                                       ref_weight=reference.lm_head.weight, beta=args.beta)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        accuracy = (out.chosen_rewards > out.rejected_rewards).float().mean()
        print(f"step {step:3d}  loss {out.loss.item():.4f}  reward accuracy {accuracy.item():.2f}  "
              f"margin {(out.chosen_rewards - out.rejected_rewards).mean().item():+.4f}")
    return out.loss.item()


if __name__ == "__main__":
    main()
