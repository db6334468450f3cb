"""Settings shared by every test directory: the hypothesis profiles.

``dev`` (the default) keeps a local run quick; ``ci`` (``pytest --hypothesis-profile=ci``)
tries more examples, has no deadline on shared runners, and prints a reproduction blob.
"""

from hypothesis import settings

settings.register_profile("dev", max_examples=100)
settings.register_profile("ci", max_examples=300, deadline=None, print_blob=True, database=None)
settings.load_profile("dev")
