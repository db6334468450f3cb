"""Settings shared by every test directory: the hypothesis profiles.

``dev`` keeps a local run quick; ``ci`` (chosen when the CI variable is set, or with
``pytest --hypothesis-profile=ci``) tries more examples and prints a reproduction
blob. Neither has a deadline: a loaded shared runner must not turn speed into failures.
"""

import os

from hypothesis import settings

settings.register_profile("dev", max_examples=100, deadline=None)
settings.register_profile("ci", max_examples=300, deadline=None, print_blob=True, database=None)
settings.load_profile("ci" if os.environ.get("CI") else "dev")
