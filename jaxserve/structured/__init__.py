"""Structured output: what a request's output must match, and its grammar matchers."""
