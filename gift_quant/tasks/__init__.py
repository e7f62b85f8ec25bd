"""lm-eval task files shipped with the package, so zero-shot evaluation runs offline."""
