# The nodes' IAM policy: exactly the actions cps-attach needs with its configuration written by
# this module (node id in the file, so no DescribeTags or DescribeAutoScalingGroups; interface;
# lifecycle hook; growing the volume when its configured size grows; with relocation, moving it
# to another zone through a snapshot under a DynamoDB lease), scoped to the cluster's tag
# wherever AWS supports a condition; reading node file secrets only when files name them, and
# only those. No provider: the tests render it as the module does, and the bench proves a boot
# needs every action in it.

terraform {
  required_version = ">= 1.7.0"
}

variable "app_name" {
  description = "The cluster: value of the cps:cluster tag."
  type        = string
}

variable "kms_key_id" {
  description = "Customer-managed key ARN of the volumes, or null."
  type        = string
}

variable "secrets" {
  description = "The content_from references of the node files (ssm:NAME, secretsmanager:NAME-OR-ARN)."
  type        = list(string)
  default     = []
}

variable "relocation" {
  description = "cps-attach may move the node's data to another zone (snapshot, new volume, retire the source) under a lease in lock_table_arn."
  type        = bool
  default     = false
}

variable "lock_table_arn" {
  description = "ARN of the relocation lock table (DynamoDB); needed with relocation."
  type        = string
  default     = null
}

variable "delete_source" {
  description = "A relocation deletes its retired source volume."
  type        = bool
  default     = false
}

variable "secrets_kms_key_arn" {
  description = "Customer-managed key ARN of those parameters or secrets, or null."
  type        = string
  default     = null
}

locals {
  cluster_condition = { "aws:ResourceTag/cps:cluster" = var.app_name }
  # The identity tags a relocation takes off the volume it moved away from (node-id and slot
  # modes): nothing then finds that volume as a node's any more.
  identity_tag_keys = ["cps:node-id", "cps:slot"]

  # A parameter's ARN is its name after "parameter/" (one slash); a secret's ends in a dash
  # and six random characters.
  parameter_names = distinct([for r in var.secrets : trimprefix(r, "ssm:") if startswith(r, "ssm:")])
  secret_ids      = distinct([for r in var.secrets : trimprefix(r, "secretsmanager:") if startswith(r, "secretsmanager:")])
  parameter_arns  = [for n in local.parameter_names : startswith(n, "arn:") ? n : "arn:aws:ssm:*:*:parameter/${trimprefix(n, "/")}"]
  secret_arns     = [for n in local.secret_ids : startswith(n, "arn:") ? n : "arn:aws:secretsmanager:*:*:secret:${n}-??????"]

  node_statements = concat(
    [
      {
        Sid      = "Describe"
        Effect   = "Allow"
        Action   = ["ec2:DescribeVolumes", "ec2:DescribeInstances", "ec2:DescribeNetworkInterfaces", "ec2:DescribeVolumesModifications"]
        Resource = "*"
      },
      {
        Sid       = "CreateClusterVolume"
        Effect    = "Allow"
        Action    = ["ec2:CreateVolume"]
        Resource  = "arn:aws:ec2:*:*:volume/*"
        Condition = { StringEquals = { "aws:RequestTag/cps:cluster" = var.app_name } }
      },
      {
        Sid       = "TagOnCreate"
        Effect    = "Allow"
        Action    = ["ec2:CreateTags"]
        Resource  = var.relocation ? ["arn:aws:ec2:*:*:volume/*", "arn:aws:ec2:*::snapshot/*"] : ["arn:aws:ec2:*:*:volume/*"]
        Condition = { StringEquals = { "ec2:CreateAction" = var.relocation ? ["CreateVolume", "CreateSnapshot"] : ["CreateVolume"] } }
      },
      {
        # The format journal: one tag on the node's own volume, written before mkfs starts and
        # after the filesystem is verified; no other key, on no other cluster's volume.
        Sid      = "FormatJournal"
        Effect   = "Allow"
        Action   = ["ec2:CreateTags"]
        Resource = "arn:aws:ec2:*:*:volume/*"
        Condition = {
          StringEquals                = local.cluster_condition
          "ForAllValues:StringEquals" = { "aws:TagKeys" = ["cps:filesystem"] }
        }
      },
      {
        # Growing a volume in place when its configured size, type or performance is larger:
        # only the cluster's volumes.
        Sid       = "GrowClusterVolume"
        Effect    = "Allow"
        Action    = ["ec2:ModifyVolume"]
        Resource  = "arn:aws:ec2:*:*:volume/*"
        Condition = { StringEquals = local.cluster_condition }
      },
      {
        Sid    = "AttachClusterVolumesAndInterfaces"
        Effect = "Allow"
        Action = ["ec2:AttachVolume", "ec2:AttachNetworkInterface"]
        Resource = [
          "arn:aws:ec2:*:*:volume/*",
          "arn:aws:ec2:*:*:network-interface/*",
          "arn:aws:ec2:*:*:instance/*",
        ]
        Condition = { StringEquals = local.cluster_condition }
      },
      {
        Sid      = "FindGroupAndHook"
        Effect   = "Allow"
        Action   = ["autoscaling:DescribeAutoScalingInstances", "autoscaling:DescribeLifecycleHooks"]
        Resource = "*"
      },
      {
        Sid       = "CompleteOwnLaunch"
        Effect    = "Allow"
        Action    = ["autoscaling:RecordLifecycleActionHeartbeat", "autoscaling:CompleteLifecycleAction"]
        Resource  = "*"
        Condition = { StringEquals = { "autoscaling:ResourceTag/cps:cluster" = var.app_name } }
      },
    ],
    # (A for expression: the statements have different shapes, which a conditional cannot join.)
    [for s in [
      {
        Sid      = "DescribeSnapshots"
        Effect   = "Allow"
        Action   = ["ec2:DescribeSnapshots"]
        Resource = "*"
      },
      {
        # A relocation's first step: a snapshot of the node's own volume, tagged with the
        # cluster in the same call (so it is the cluster's from its first moment).
        Sid       = "SnapshotClusterVolume"
        Effect    = "Allow"
        Action    = ["ec2:CreateSnapshot"]
        Resource  = "arn:aws:ec2:*:*:volume/*"
        Condition = { StringEquals = local.cluster_condition }
      },
      {
        Sid       = "CreateClusterSnapshot"
        Effect    = "Allow"
        Action    = ["ec2:CreateSnapshot"]
        Resource  = "arn:aws:ec2:*::snapshot/*"
        Condition = { StringEquals = { "aws:RequestTag/cps:cluster" = var.app_name } }
      },
      {
        # The new volume in the new zone, from one of the cluster's snapshots (the volume
        # itself falls under CreateClusterVolume).
        Sid       = "CreateVolumeFromClusterSnapshot"
        Effect    = "Allow"
        Action    = ["ec2:CreateVolume"]
        Resource  = "arn:aws:ec2:*::snapshot/*"
        Condition = { StringEquals = local.cluster_condition }
      },
      {
        # Retiring the source: only its identity tags, only on the cluster's volumes. The Null
        # condition requires the request to name its keys: DeleteTags without any deletes every
        # tag, and ForAllValues alone would let that through.
        Sid      = "RetireClusterVolume"
        Effect   = "Allow"
        Action   = ["ec2:DeleteTags"]
        Resource = "arn:aws:ec2:*:*:volume/*"
        Condition = {
          StringEquals                = local.cluster_condition
          "ForAllValues:StringEquals" = { "aws:TagKeys" = local.identity_tag_keys }
          Null                        = { "aws:TagKeys" = "false" }
        }
      },
      {
        # Retiring the source (`cps:retired-by` = the new volume) and handing the node's
        # identity to the new volume: those keys only, on the cluster's volumes.
        Sid      = "RetireAndHandOver"
        Effect   = "Allow"
        Action   = ["ec2:CreateTags"]
        Resource = "arn:aws:ec2:*:*:volume/*"
        Condition = {
          StringEquals                = local.cluster_condition
          "ForAllValues:StringEquals" = { "aws:TagKeys" = concat(["cps:retired-by"], local.identity_tag_keys) }
        }
      },
      {
        # The lease deciding which node may move a volume: conditional writes on one table.
        Sid      = "RelocationLease"
        Effect   = "Allow"
        Action   = ["dynamodb:GetItem", "dynamodb:UpdateItem"]
        Resource = var.lock_table_arn
      },
    ] : s if var.relocation],
    !(var.relocation && var.delete_source) ? [] : [{
      # Deleting a relocation's retired source: a cluster volume that no longer carries a node
      # id (or slot). A volume some node still calls its own cannot be deleted.
      Sid      = "DeleteRetiredClusterVolume"
      Effect   = "Allow"
      Action   = ["ec2:DeleteVolume"]
      Resource = "arn:aws:ec2:*:*:volume/*"
      Condition = {
        StringEquals = local.cluster_condition
        Null         = { "aws:ResourceTag/cps:node-id" = "true", "aws:ResourceTag/cps:slot" = "true" }
      }
    }],
    var.kms_key_id == null ? [] : [{
      Sid      = "UseVolumeKey"
      Effect   = "Allow"
      Action   = ["kms:CreateGrant", "kms:GenerateDataKeyWithoutPlaintext", "kms:Decrypt"]
      Resource = var.kms_key_id
    }],
    length(local.parameter_arns) == 0 ? [] : [{
      Sid      = "ReadNodeFileParameters"
      Effect   = "Allow"
      Action   = ["ssm:GetParameter"]
      Resource = local.parameter_arns
    }],
    length(local.secret_arns) == 0 ? [] : [{
      Sid      = "ReadNodeFileSecrets"
      Effect   = "Allow"
      Action   = ["secretsmanager:GetSecretValue"]
      Resource = local.secret_arns
    }],
    var.secrets_kms_key_arn == null || length(var.secrets) == 0 ? [] : [{
      Sid      = "DecryptNodeFileSecrets"
      Effect   = "Allow"
      Action   = ["kms:Decrypt"]
      Resource = var.secrets_kms_key_arn
    }],
  )
}

output "json" {
  description = "The policy document."
  value       = jsonencode({ Version = "2012-10-17", Statement = local.node_statements })
}

output "actions" {
  description = "Every action it grants (sorted)."
  value       = sort(distinct(flatten([for s in local.node_statements : s.Action])))
}
