"""``python -m peftc …``: the ``peftc`` command, for launchers that run modules (``torchrun -m peftc train …``)."""

from peftc.cli import main

if __name__ == "__main__":
    main()
