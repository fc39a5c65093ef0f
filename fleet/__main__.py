"""``python -m fleet``.

``comment`` runs in the trusted ``pr-comment`` workflow on a bare Python with no project
requirements installed, so it is dispatched here before anything that imports them
(``fleet.cli.main`` loads pydantic, and its parser registers ``verify``, which loads dcap-qvl):
the poster and everything it imports are the standard library only.
"""

import sys

if sys.argv[1:2] == ["comment"]:
    from fleet.plan import prcomment

    sys.exit(prcomment.main(sys.argv[2:]))

from fleet.cli.main import main  # noqa: E402 - after the comment dispatch on purpose

sys.exit(main())
