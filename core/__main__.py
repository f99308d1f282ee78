"""``python -m distill`` runs the command line (also what ``accelerate launch -m distill`` uses)."""

from distill.cli import main

if __name__ == "__main__":
    main()
