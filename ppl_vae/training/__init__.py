"""Training a pair with SVI: configuration, engine, validation, the divergence guard,
signals, resume state and the loop.
"""
