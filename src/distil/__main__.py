"""``python -m distil`` runs the command line (also under torchrun)."""

from distil.cli import main

if __name__ == "__main__":
    main()
