# What keeps and moves the data beyond one volume: the relocation lock (a DynamoDB table whose
# conditional writes decide which node may move a volume to another zone) and scheduled snapshots
# of the cluster's volumes (Data Lifecycle Manager).

resource "aws_dynamodb_table" "relocation_lock" {
  #checkov:skip=CKV_AWS_28:Leases only; restoring a table of old leases would hand out stale ones. relocation_lock_point_in_time_recovery turns it on.
  #checkov:skip=CKV_AWS_119:Encrypted at rest with the AWS-managed key; a customer-managed key would add a KMS grant to every boot for a table that holds no data.
  count        = var.relocation == "never" ? 0 : 1
  name         = "${var.app_name}-cps-relocation"
  billing_mode = "PAY_PER_REQUEST"
  hash_key     = "key"

  attribute {
    name = "key"
    type = "S"
  }

  server_side_encryption {
    enabled = true
  }

  point_in_time_recovery {
    enabled = var.relocation_lock_point_in_time_recovery
  }

  tags = local.cluster_tags
}

resource "aws_iam_role" "dlm" {
  count       = var.snapshots == null ? 0 : 1
  name_prefix = "${var.app_name}-dlm-"
  assume_role_policy = jsonencode({
    Version = "2012-10-17"
    Statement = [{
      Effect    = "Allow"
      Action    = "sts:AssumeRole"
      Principal = { Service = "dlm.amazonaws.com" }
    }]
  })
  tags = local.cluster_tags
}

resource "aws_iam_role_policy_attachment" "dlm" {
  count      = var.snapshots == null ? 0 : 1
  role       = aws_iam_role.dlm[0].name
  policy_arn = "arn:aws:iam::aws:policy/service-role/AWSDataLifecycleManagerServiceRole"
}

# Every volume tagged cps:cluster = app_name (the nodes' volumes, and sources a relocation
# retired until they are deleted), snapshotted every interval_hours, the last `retain` kept.
# The snapshots copy the volume's tags: cps:cluster and cps:node-id say whose they are.
resource "aws_dlm_lifecycle_policy" "snapshots" {
  count              = var.snapshots == null ? 0 : 1
  description        = "cps data volumes of ${var.app_name}"
  execution_role_arn = aws_iam_role.dlm[0].arn
  state              = "ENABLED"

  policy_details {
    resource_types = ["VOLUME"]
    target_tags    = { "cps:cluster" = var.app_name }

    schedule {
      name      = "every ${var.snapshots.interval_hours} hours keep ${var.snapshots.retain}"
      copy_tags = true
      tags_to_add = {
        "cps:snapshot" = "scheduled"
      }

      create_rule {
        interval      = var.snapshots.interval_hours
        interval_unit = "HOURS"
        times         = var.snapshots.times
      }

      retain_rule {
        count = var.snapshots.retain
      }
    }
  }

  tags = local.cluster_tags

  depends_on = [aws_iam_role_policy_attachment.dlm]
}
