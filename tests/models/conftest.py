"""Fixtures shared by the model tests."""

import pytest

from tests.models.liu2023_layout import random_their_net


@pytest.fixture(scope="module")
def theirs():
    """The authors' network in their key layout, random weights and BN statistics."""
    return random_their_net(num_classes=100)
