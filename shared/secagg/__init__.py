"""Secure aggregation primitives (SecAgg+-style) shared by server workflow and client mod."""
