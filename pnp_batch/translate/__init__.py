"""The Translator: one loaded model in one worker; a group of rows sharing a source in, images and
records out (inversion through the feature store, then PnP sampling from pnp/)."""
