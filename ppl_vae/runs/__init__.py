"""Run folders and what is made from them: train/resume/load, evaluate, sweep, report pages,
plots and the demo.
"""
