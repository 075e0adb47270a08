# The ferry workloads on this region's cluster: the namespace, the `ferry-secrets` secret built from the managed
# resources, and the region's kustomize overlay (k8s/overlays/<overlay>) applied object by object with the
# kbst/kustomization provider. The overlay's own Namespace and ferry-secrets objects, if it has any (e.g. a
# placeholder for `kubectl apply -k` on a laptop), are left out: Terraform owns those two here.

locals {
  k8s_root     = coalesce(var.k8s_root, "${path.module}/../../../k8s")
  overlay_path = "${local.k8s_root}/overlays/${var.kustomize_overlay}"

  # redis-urls: the engine's comma-separated shard list (FERRY_REDIS_URLS). One replication group is one shard;
  # rediss:// is Redis over TLS with the AUTH token as password. In cluster mode the secret holds redis-cluster
  # instead (FERRY_REDIS_CLUSTER): the configuration endpoint, from which ferry finds every node.
  redis_host = var.redis_cluster_mode ? aws_elasticache_replication_group.this.configuration_endpoint_address : aws_elasticache_replication_group.this.primary_endpoint_address
  redis_urls = join(",", [
    "rediss://:${random_password.redis_auth.result}@${local.redis_host}:${aws_elasticache_replication_group.this.port}",
  ])
  redis_key = var.redis_cluster_mode ? "redis-cluster" : "redis-urls"

  database_url = format(
    "postgres://%s:%s@%s:%d/%s?sslmode=require",
    var.postgres_username,
    random_password.postgres.result,
    aws_db_instance.this.address,
    aws_db_instance.this.port,
    var.postgres_database_name,
  )

  # Kustomize resource ids are "<group>/<Kind>/<namespace>/<name>" with "_" for the core group or no namespace.
  terraform_owned_ids = [
    "_/Namespace/_/${var.namespace}",
    "_/Secret/${var.namespace}/ferry-secrets",
  ]
}

resource "kubernetes_namespace" "ferry" {
  metadata {
    name = var.namespace

    labels = {
      # The labels of k8s/base/namespace.yaml, whose object this replaces.
      "app.kubernetes.io/part-of"          = "ferry"
      "pod-security.kubernetes.io/enforce" = "restricted"
      "pod-security.kubernetes.io/warn"    = "restricted"
    }
  }

  # The nodes must exist before anything is scheduled; access entries before non-creator admins use the API.
  depends_on = [aws_eks_node_group.default, aws_eks_access_policy_association.admin]
}

resource "kubernetes_secret" "ferry" {
  metadata {
    name      = "ferry-secrets"
    namespace = kubernetes_namespace.ferry.metadata[0].name

    labels = {
      "app.kubernetes.io/part-of" = "ferry"
    }
  }

  type = "Opaque"

  data = {
    "jwt-secret"      = var.jwt_secret
    "database-url"    = local.database_url
    (local.redis_key) = local.redis_urls
  }
}

data "kustomization_build" "overlay" {
  path = local.overlay_path
}

locals {
  overlay = data.kustomization_build.overlay

  # The overlay's objects in the provider's three passes (namespaces and CRDs; everything else; webhooks), less
  # the ones Terraform owns above.
  overlay_ids = [for ids in local.overlay.ids_prio : toset([for id in ids : id if !contains(local.terraform_owned_ids, id)])]
}

resource "kustomization_resource" "p0" {
  for_each = local.overlay_ids[0]

  manifest = local.overlay.manifests[each.value]

  depends_on = [kubernetes_namespace.ferry]
}

resource "kustomization_resource" "p1" {
  for_each = local.overlay_ids[1]

  # Secrets in the overlay (other than ferry-secrets) stay out of the plan output.
  manifest = startswith(each.value, "_/Secret/") ? sensitive(local.overlay.manifests[each.value]) : local.overlay.manifests[each.value]

  # Wait for Deployments to roll out, so the gateway Service has endpoints when DNS health checks start.
  wait = true

  depends_on = [kustomization_resource.p0, kubernetes_secret.ferry]
}

resource "kustomization_resource" "p2" {
  for_each = local.overlay_ids[2]

  manifest = local.overlay.manifests[each.value]

  depends_on = [kustomization_resource.p1]
}

# The gateways' public entry: the overlay's ferry-gateway Service is ClusterIP (in-cluster traffic), so Terraform
# adds a LoadBalancer Service in front of the same pods, which gives an AWS Network Load Balancer in the public
# subnets (TLS on 443 with gateway_tls_certificate_arn, else HTTP on 80; WebSockets pass through as TCP). Its
# hostname is the target of the region's latency-routed DNS record; the provider waits until it has one.
locals {
  gateway_tls      = var.gateway_tls_certificate_arn != null
  gateway_port     = local.gateway_tls ? 443 : 80
  gateway_protocol = local.gateway_tls ? "HTTPS" : "HTTP"
}

resource "kubernetes_service_v1" "gateway_public" {
  metadata {
    name      = "ferry-gateway-public"
    namespace = kubernetes_namespace.ferry.metadata[0].name

    labels = {
      "app.kubernetes.io/name"      = "ferry"
      "app.kubernetes.io/component" = "gateway"
      "app.kubernetes.io/part-of"   = "ferry"
    }

    annotations = merge(
      {
        "service.beta.kubernetes.io/aws-load-balancer-type"                              = "nlb"
        "service.beta.kubernetes.io/aws-load-balancer-cross-zone-load-balancing-enabled" = "true"
      },
      local.gateway_tls ? {
        "service.beta.kubernetes.io/aws-load-balancer-ssl-cert"         = var.gateway_tls_certificate_arn
        "service.beta.kubernetes.io/aws-load-balancer-ssl-ports"        = "https"
        "service.beta.kubernetes.io/aws-load-balancer-backend-protocol" = "tcp"
      } : {},
    )
  }

  spec {
    type = "LoadBalancer"

    # The selector of the overlay's gateway Deployment (k8s/base/gateway.yaml).
    selector = {
      "app.kubernetes.io/name"      = "ferry"
      "app.kubernetes.io/component" = "gateway"
    }

    port {
      name        = local.gateway_tls ? "https" : "http"
      port        = local.gateway_port
      target_port = "http"
      protocol    = "TCP"
    }
  }

  wait_for_load_balancer = true

  depends_on = [kustomization_resource.p1]
}

locals {
  gateway_ingress  = try(kubernetes_service_v1.gateway_public.status[0].load_balancer[0].ingress[0], {})
  gateway_hostname = try(coalesce(local.gateway_ingress.hostname, local.gateway_ingress.ip), "")
}
