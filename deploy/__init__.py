"""Deployment tools: the local SageMaker runtime emulator (more to come: ECR, endpoints)."""
