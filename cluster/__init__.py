"""Running rooflab on more than one machine, below the flows: the services a cluster deployment talks to (a Prefect
server, process workers, an MLflow tracking server; :mod:`cluster.services`) and the Kubernetes launcher
(:mod:`cluster.k8s_manifests`, :mod:`cluster.k8s_launcher`). Imports neither Prefect nor MLflow (their servers run
as commands), nor ``flows``, ``tasks``, ``tracking`` or ``cli``."""
