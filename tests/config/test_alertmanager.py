"""The alertmanager.* keys: defaults, environment variables, and refused values."""

import pytest

from grafana_plugin_backend.config.base import ConfigError
from grafana_plugin_backend.config.settings import load_config


def test_off_by_default_and_set_from_the_environment():
    assert load_config(None, environ={}).alertmanager.url == ""
    am = load_config(None, environ={"PROMVAE_ALERTMANAGER_URL": "http://am:9093",
                                    "PROMVAE_ALERTMANAGER_FEEDBACK_INTERVAL": "15s"}).alertmanager
    assert (am.url, am.feedback_interval, am.timeout) == ("http://am:9093", 15.0, 10.0)


@pytest.mark.parametrize("overrides, match", [
    ({"alertmanager.url": "am:9093"}, "alertmanager.url: must start with http"),
    ({"alertmanager.feedback_interval": "0s"}, "must be positive"),
    ({"alertmanager.timeout": "-1s"}, "alertmanager"),
])
def test_bad_values_are_refused_with_the_key(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, environ={}, overrides=overrides)
