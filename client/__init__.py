"""The weckd site: Flower ClientApp, site-local data and settings, metrics and the weckd-client CLI."""
