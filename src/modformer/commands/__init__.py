"""The CLI layer's command functions: argparse namespaces in, library calls out."""
