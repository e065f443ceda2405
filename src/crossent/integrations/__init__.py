"""crossent inside other libraries' training stacks (each an optional dependency):

- :mod:`crossent.integrations.transformers`: Hugging Face causal language models compute
  their training loss with :func:`crossent.linear_cross_entropy`, without the logits.
- :mod:`crossent.integrations.trl`: TRL's fused LM head (SFT, GRPO, RLOO, KTO trainers)
  computed with :func:`crossent.linear_token_stats`.
"""
