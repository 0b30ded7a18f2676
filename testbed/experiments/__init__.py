"""The experiment harness: a matrix of attacks against defenses, and its report."""
