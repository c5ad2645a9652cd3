# The nodes' IAM policy: exactly the actions cps-attach needs with its configuration written by
# this module (node id in the file, so no DescribeTags or DescribeAutoScalingGroups; interface;
# lifecycle hook), scoped to the cluster's tag
# wherever AWS supports a condition. No provider: the tests render it as the module does, and the
# bench proves a boot needs every action in it.

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

locals {
  cluster_condition = { "aws:ResourceTag/cps:cluster" = var.app_name }

  node_statements = concat(
    [
      {
        Sid      = "Describe"
        Effect   = "Allow"
        Action   = ["ec2:DescribeVolumes", "ec2:DescribeInstances", "ec2:DescribeNetworkInterfaces"]
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
        Resource  = "arn:aws:ec2:*:*:volume/*"
        Condition = { StringEquals = { "ec2:CreateAction" = "CreateVolume" } }
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
    var.kms_key_id == null ? [] : [{
      Sid      = "UseVolumeKey"
      Effect   = "Allow"
      Action   = ["kms:CreateGrant", "kms:GenerateDataKeyWithoutPlaintext", "kms:Decrypt"]
      Resource = var.kms_key_id
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
