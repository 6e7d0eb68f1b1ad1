"""Evaluation protocols for generative tasks: prompt formats, answer extraction, scoring.

Pure functions over text (no model code): `commonsense` (LLM-Adapters), `math` (GSM8K,
MATH / MATH-500), `humaneval` (execution in `tasks.sandbox`, pass@k).
"""
