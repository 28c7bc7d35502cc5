"""Passes over the IR: each is a function from a Graph to a Graph (or an annotation of it)."""
