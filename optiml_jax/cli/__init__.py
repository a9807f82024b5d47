"""The command-line front ends (optiml-finetune, -generate, -evaluate, -convert and
`python -m optiml_jax.lm_eval`); common.py holds what they share. Library code never imports from here."""
