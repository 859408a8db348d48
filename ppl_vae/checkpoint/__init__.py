"""Checkpoints: a safetensors file (never unpickled) with a JSON body, written atomically,
and restoring the parameter store, optimiser and RNG from it.
"""
