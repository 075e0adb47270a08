# One region of ferry: the network, the shared KMS key and the common names. The EKS cluster is in eks.tf,
# Redis in redis.tf, PostgreSQL in postgres.tf, the generated secrets in secrets.tf and the Kubernetes side
# (namespace, ferry-secrets, the kustomize overlay) in workloads.tf.

data "aws_caller_identity" "current" {}

data "aws_partition" "current" {}

locals {
  wanted_azs = var.availability_zones != null ? var.availability_zones : [for z in ["a", "b", "c"] : "${var.region}${z}"]
}

# The zones are pinned by name (never "the first N available"), so the subnets cannot move when AWS adds a zone
# or one is impaired; reading them back checks that they exist in this region and account.
data "aws_availability_zones" "selected" {
  all_availability_zones = true

  filter {
    name   = "zone-name"
    values = local.wanted_azs
  }

  lifecycle {
    postcondition {
      condition     = length(self.names) == length(local.wanted_azs)
      error_message = "Some of the availability_zones do not exist in this region."
    }
  }
}

locals {
  prefix       = "${var.name}-${var.region}"
  cluster_name = local.prefix
  azs          = local.wanted_azs
  account_id   = data.aws_caller_identity.current.account_id
  partition    = data.aws_partition.current.partition

  # Private subnets (nodes, Redis, PostgreSQL) are the first six 1/8 blocks of the VPC range (a /19 each out of a
  # /16), public subnets (NAT gateways, load balancers) 1/64 blocks from the last quarter (a /22 each): no
  # overlap for up to six zones.
  private_subnet_cidrs = [for i, _ in local.azs : cidrsubnet(var.vpc_cidr, 3, i)]
  public_subnet_cidrs  = [for i, _ in local.azs : cidrsubnet(var.vpc_cidr, 6, 48 + i)]

  tags = merge(var.tags, {
    "app.kubernetes.io/part-of" = "ferry"
    "ferry/region"              = var.region
    "managed-by"                = "terraform"
  })
}

# ---------------------------------------------------------------------------------------------------------------
# KMS: one customer-managed key per region encrypts EKS secrets, Redis, PostgreSQL (storage and Performance
# Insights), Secrets Manager secrets and the CloudWatch log groups.

data "aws_iam_policy_document" "kms" {
  #checkov:skip=CKV_AWS_109:A KMS key policy's Resource is always "*" (it means this key); the account root principal keeps IAM in control.
  #checkov:skip=CKV_AWS_111:A KMS key policy's Resource is always "*" (it means this key).
  #checkov:skip=CKV_AWS_356:A KMS key policy's Resource is always "*" (it means this key).
  statement {
    sid       = "AccountAdministers"
    actions   = ["kms:*"]
    resources = ["*"]

    principals {
      type        = "AWS"
      identifiers = ["arn:${local.partition}:iam::${local.account_id}:root"]
    }
  }

  statement {
    sid = "CloudWatchLogsUse"
    actions = [
      "kms:Encrypt*",
      "kms:Decrypt*",
      "kms:ReEncrypt*",
      "kms:GenerateDataKey*",
      "kms:Describe*",
    ]
    resources = ["*"]

    principals {
      type        = "Service"
      identifiers = ["logs.${var.region}.amazonaws.com"]
    }

    condition {
      test     = "ArnLike"
      variable = "kms:EncryptionContext:aws:logs:arn"
      values   = ["arn:${local.partition}:logs:${var.region}:${local.account_id}:log-group:*"]
    }
  }
}

resource "aws_kms_key" "this" {
  description             = "ferry ${var.region}: EKS secrets, Redis, PostgreSQL, Secrets Manager and logs"
  enable_key_rotation     = true
  deletion_window_in_days = 30
  policy                  = data.aws_iam_policy_document.kms.json
  tags                    = local.tags
}

resource "aws_kms_alias" "this" {
  name          = "alias/${local.prefix}"
  target_key_id = aws_kms_key.this.key_id
}

# ---------------------------------------------------------------------------------------------------------------
# VPC: public subnets (NAT gateways and the gateways' internet-facing load balancer) and private subnets (nodes,
# Redis, PostgreSQL), one of each per availability zone, one NAT gateway per zone so a zone outage does not cut
# the others' egress.

resource "aws_vpc" "this" {
  cidr_block           = var.vpc_cidr
  enable_dns_support   = true
  enable_dns_hostnames = true
  tags                 = merge(local.tags, { Name = local.prefix })
}

# The default security group of the VPC is emptied: nothing may use it by accident.
resource "aws_default_security_group" "this" {
  vpc_id = aws_vpc.this.id
  tags   = merge(local.tags, { Name = "${local.prefix}-default-deny" })
}

resource "aws_internet_gateway" "this" {
  vpc_id = aws_vpc.this.id
  tags   = merge(local.tags, { Name = local.prefix })
}

resource "aws_subnet" "public" {
  count = length(local.azs)

  vpc_id            = aws_vpc.this.id
  availability_zone = local.azs[count.index]
  cidr_block        = local.public_subnet_cidrs[count.index]
  # Nothing launched here needs a public IP of its own: NAT gateways use Elastic IPs and load balancers their own.
  map_public_ip_on_launch = false

  tags = merge(local.tags, {
    Name                                          = "${local.prefix}-public-${local.azs[count.index]}"
    "kubernetes.io/role/elb"                      = "1"
    "kubernetes.io/cluster/${local.cluster_name}" = "shared"
  })
}

resource "aws_subnet" "private" {
  count = length(local.azs)

  vpc_id            = aws_vpc.this.id
  availability_zone = local.azs[count.index]
  cidr_block        = local.private_subnet_cidrs[count.index]

  tags = merge(local.tags, {
    Name                                          = "${local.prefix}-private-${local.azs[count.index]}"
    "kubernetes.io/role/internal-elb"             = "1"
    "kubernetes.io/cluster/${local.cluster_name}" = "shared"
  })
}

resource "aws_eip" "nat" {
  count = length(local.azs)

  domain = "vpc"
  tags   = merge(local.tags, { Name = "${local.prefix}-nat-${local.azs[count.index]}" })

  depends_on = [aws_internet_gateway.this]
}

resource "aws_nat_gateway" "this" {
  count = length(local.azs)

  allocation_id = aws_eip.nat[count.index].id
  subnet_id     = aws_subnet.public[count.index].id
  tags          = merge(local.tags, { Name = "${local.prefix}-${local.azs[count.index]}" })
}

resource "aws_route_table" "public" {
  vpc_id = aws_vpc.this.id
  tags   = merge(local.tags, { Name = "${local.prefix}-public" })
}

resource "aws_route" "public_internet" {
  route_table_id         = aws_route_table.public.id
  destination_cidr_block = "0.0.0.0/0"
  gateway_id             = aws_internet_gateway.this.id
}

resource "aws_route_table_association" "public" {
  count = length(local.azs)

  subnet_id      = aws_subnet.public[count.index].id
  route_table_id = aws_route_table.public.id
}

resource "aws_route_table" "private" {
  count = length(local.azs)

  vpc_id = aws_vpc.this.id
  tags   = merge(local.tags, { Name = "${local.prefix}-private-${local.azs[count.index]}" })
}

resource "aws_route" "private_nat" {
  count = length(local.azs)

  route_table_id         = aws_route_table.private[count.index].id
  destination_cidr_block = "0.0.0.0/0"
  nat_gateway_id         = aws_nat_gateway.this[count.index].id
}

resource "aws_route_table_association" "private" {
  count = length(local.azs)

  subnet_id      = aws_subnet.private[count.index].id
  route_table_id = aws_route_table.private[count.index].id
}

# VPC flow logs (all traffic) to an encrypted CloudWatch log group.
resource "aws_cloudwatch_log_group" "flow_logs" {
  name              = "/aws/vpc/${local.prefix}/flow-logs"
  retention_in_days = var.log_retention_days
  kms_key_id        = aws_kms_key.this.arn
  tags              = local.tags
}

data "aws_iam_policy_document" "flow_logs_assume" {
  statement {
    actions = ["sts:AssumeRole"]

    principals {
      type        = "Service"
      identifiers = ["vpc-flow-logs.amazonaws.com"]
    }

    condition {
      test     = "StringEquals"
      variable = "aws:SourceAccount"
      values   = [local.account_id]
    }
  }
}

resource "aws_iam_role" "flow_logs" {
  name_prefix        = "${var.name}-flow-logs-"
  assume_role_policy = data.aws_iam_policy_document.flow_logs_assume.json
  tags               = local.tags
}

data "aws_iam_policy_document" "flow_logs" {
  statement {
    actions = [
      "logs:CreateLogStream",
      "logs:PutLogEvents",
      "logs:DescribeLogStreams",
    ]
    resources = ["${aws_cloudwatch_log_group.flow_logs.arn}:*"]
  }
}

resource "aws_iam_role_policy" "flow_logs" {
  name   = "write-flow-logs"
  role   = aws_iam_role.flow_logs.id
  policy = data.aws_iam_policy_document.flow_logs.json
}

resource "aws_flow_log" "this" {
  vpc_id          = aws_vpc.this.id
  traffic_type    = "ALL"
  log_destination = aws_cloudwatch_log_group.flow_logs.arn
  iam_role_arn    = aws_iam_role.flow_logs.arn
  tags            = local.tags
}
