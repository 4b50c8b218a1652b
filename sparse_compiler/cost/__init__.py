"""Deciding what to make sparse: the planner turns candidates into decisions."""
