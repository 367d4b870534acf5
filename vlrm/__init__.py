"""Shared package: configuration, data and schemas used by actors, rewards and the learner."""
