output "asg_names" {
  description = "node id → Auto Scaling group name."
  value       = { for id, g in aws_autoscaling_group.node : id => g.name }
}

output "iam_role_name" {
  description = "The nodes' IAM role (attach more policies to it for your application)."
  value       = aws_iam_role.node.name
}

output "node_user_data" {
  description = "node id → rendered user data (plain text)."
  value       = { for id, lt in aws_launch_template.node : id => base64decode(lt.user_data) }
}

output "node_ips" {
  description = "node id → fixed private IP."
  value       = { for id, eni in local.interfaces : id => one(eni.private_ips) }
}

output "node_volume_ids" {
  description = "node id → data volume id."
  value       = { for id, v in local.volumes : id => v.id }
}

output "node_interface_ids" {
  description = "node id → fixed-IP network interface id."
  value       = { for id, eni in local.interfaces : id => eni.id }
}

output "iam_actions" {
  description = "Every action the nodes' policy grants (sorted)."
  value       = module.node_policy.actions
}

output "relocation_lock_table" {
  description = "Name of the DynamoDB table holding cps-attach's relocation leases (null with relocation = \"never\")."
  value       = one(aws_dynamodb_table.relocation_lock[*].name)
}

output "snapshot_policy_id" {
  description = "The Data Lifecycle Manager policy snapshotting the cluster's volumes (null without snapshots)."
  value       = one(aws_dlm_lifecycle_policy.snapshots[*].id)
}
