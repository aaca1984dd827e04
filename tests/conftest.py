import os

from hypothesis import settings

# "ci" runs every property test a few hundred times; "long" is the fuzzing mode
# (HYPOTHESIS_PROFILE=long) that feeds 100,000 inputs to each decoder.
settings.register_profile("ci", max_examples=300, deadline=None)
settings.register_profile("long", max_examples=100_000, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
