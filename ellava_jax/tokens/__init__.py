"""FitPrune visual-token pruning: recipe fitting and application."""
